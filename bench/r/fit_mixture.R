# Fit a mixture of linear-Gaussian regressions with R's flexmix or mixtools.
#
#   Rscript fit_mixture.R TRAIN.csv K NREP GATE TOOL OUT.csv
#
# GATE is "softmax" (flexmix: FLXPmultinom concomitant model on the same features)
# or "constant". TOOL is "flexmix" or "mixtools" (regmixEM, constant gate only).
# NREP independent starts are run and the best log-likelihood is kept, as
# stepFlexmix does. OUT.csv gets name,value rows: timings, iterations and the
# parameters of the best fit, which the Python side turns into held-out
# log-likelihoods with the same formula it uses for moekit.
args <- commandArgs(trailingOnly = TRUE)
train <- read.csv(args[1])
k <- as.integer(args[2])
nrep <- as.integer(args[3])
gate <- args[4]
tool <- args[5]
out <- args[6]
feats <- setdiff(names(train), "y")
n <- nrow(train)
rows <- list()
put <- function(name, value) rows[[length(rows) + 1]] <<- data.frame(name = name, value = value)
set.seed(1)

if (tool == "flexmix") {
  suppressPackageStartupMessages(library(flexmix))
  fml <- as.formula(paste("y ~", paste(feats, collapse = " + ")))
  conc <- if (gate == "softmax") {
    FLXPmultinom(as.formula(paste("~", paste(feats, collapse = " + "))))
  } else {
    FLXPconstant()
  }
  # flexmix stops when the relative change of the log-likelihood is below
  # `tolerance`; 1e-6 of |log L| ~ n is about moekit's 1e-6 per sample.
  ctrl <- list(iter.max = 1000, tolerance = 1e-6, minprior = 0)
  elapsed <- system.time({
    fits <- lapply(seq_len(nrep), function(r) {
      flexmix(fml, data = train, k = k, model = FLXMRglm(family = "gaussian"),
              concomitant = conc, control = ctrl)
    })
  })[["elapsed"]]
  ll <- sapply(fits, function(f) as.numeric(logLik(f)))
  best <- fits[[which.max(ll)]]
  put("seconds", elapsed)
  put("iterations_best", best@iter)
  put("iterations_total", sum(sapply(fits, function(f) f@iter)))
  put("loglik", max(ll))
  put("k_found", best@k)
  p <- parameters(best)  # (1 + d + 1) x K: intercept, slopes, sigma
  for (j in seq_len(ncol(p))) {
    put(paste0("intercept_", j), p[1, j])
    for (f in seq_along(feats)) put(paste0("coef_", j, "_", f), p[1 + f, j])
    put(paste0("sigma_", j), p[nrow(p), j])
  }
  if (gate == "softmax") {
    g <- parameters(best, which = "concomitant")  # (1 + d) x K, first column zero
    for (j in seq_len(ncol(g))) {
      put(paste0("gate_intercept_", j), g[1, j])
      for (f in seq_along(feats)) put(paste0("gate_coef_", j, "_", f), g[1 + f, j])
    }
  } else {
    pri <- prior(best)
    for (j in seq_along(pri)) put(paste0("prior_", j), pri[j])
  }
  if (length(args) >= 7 && args[7] == "refit") {
    # standard errors from flexmix's refit() (observed information at the optimum)
    rf <- refit(best)
    for (j in seq_len(best@k)) {
      cf <- rf@components[[1]][[j]]  # (Intercept), x1, ...: Estimate, Std. Error, ...
      for (r in seq_len(nrow(cf))) put(paste0("se_comp_", j, "_", rownames(cf)[r]), cf[r, 2])
    }
    if (gate == "softmax") {
      for (nm in names(rf@concomitant)) {  # Comp.2 .. Comp.K, relative to Comp.1
        cc <- rf@concomitant[[nm]]
        j <- sub("Comp.", "", nm, fixed = TRUE)
        for (r in seq_len(nrow(cc))) put(paste0("se_gate_", j, "_", rownames(cc)[r]), cc[r, 2])
      }
    }
  }
} else if (tool == "mixtools") {
  suppressPackageStartupMessages(library(mixtools))
  x <- as.matrix(train[feats])
  fits <- list()
  elapsed <- system.time({
    for (r in seq_len(nrep)) {
      # epsilon is on the total log-likelihood: 1e-6 per sample, as moekit's tol
      invisible(capture.output(
        fits[[r]] <- regmixEM(train$y, x, k = k, epsilon = 1e-6 * n, maxit = 1000)
      ))
    }
  })[["elapsed"]]
  ll <- sapply(fits, function(f) f$loglik)
  best <- fits[[which.max(ll)]]
  put("seconds", elapsed)
  put("iterations_best", length(best$all.loglik) - 1)
  put("iterations_total", sum(sapply(fits, function(f) length(f$all.loglik) - 1)))
  put("loglik", max(ll))
  put("k_found", k)
  for (j in seq_len(k)) {
    put(paste0("intercept_", j), best$beta[1, j])
    for (f in seq_along(feats)) put(paste0("coef_", j, "_", f), best$beta[1 + f, j])
    put(paste0("sigma_", j), if (length(best$sigma) == k) best$sigma[j] else best$sigma[1])
    put(paste0("prior_", j), best$lambda[j])
  }
} else {
  stop(paste("unknown tool", tool))
}
write.csv(do.call(rbind, rows), out, row.names = FALSE)
