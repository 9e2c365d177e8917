# Fit one mixture of GLMs with flexmix's stepFlexmix, as a user would.
#
#   Rscript fit_flexmix.R DATA.csv FORMULA CONCOMITANT FAMILY K NREP MINPRIOR REPEATS OUT
#
# FORMULA is an R model formula on DATA's columns ("yn ~ x + I(x^2)"); CONCOMITANT
# is a one-sided formula for FLXPmultinom ("~ x") or "none" for FLXPconstant;
# FAMILY is "gaussian" or "poisson"; MINPRIOR is "default" (flexmix's 0.05, which
# drops components whose prior falls below it) or a number. The stepFlexmix call
# (NREP starts, the best kept) runs REPEATS times with seeds 1, 2, ...; each
# elapsed time is measured with system.time. Writes OUT_summary.csv (name,value:
# the seed-1 fit's log-likelihood, df, components left, iterations; every repeat's
# log-likelihood and seconds) and OUT_params.csv (component,part,term,value: the
# seed-1 fit's coefficients, sigmas, concomitant coefficients and priors).
args <- commandArgs(trailingOnly = TRUE)
train <- read.csv(args[1])
fml <- as.formula(args[2])
conc_arg <- args[3]
family <- args[4]
k <- as.integer(args[5])
nrep <- as.integer(args[6])
minprior <- args[7]
repeats <- as.integer(args[8])
out <- args[9]
suppressPackageStartupMessages(library(flexmix))
model <- FLXMRglm(family = family)
conc <- if (conc_arg == "none") FLXPconstant() else FLXPmultinom(as.formula(conc_arg))

fit_once <- function() {
  if (minprior == "default") {
    stepFlexmix(fml, data = train, k = k, nrep = nrep, model = model,
                concomitant = conc, verbose = FALSE)
  } else {
    stepFlexmix(fml, data = train, k = k, nrep = nrep, model = model,
                concomitant = conc, control = list(minprior = as.numeric(minprior)),
                verbose = FALSE)
  }
}

rows <- list()
put <- function(name, value) rows[[length(rows) + 1]] <<- data.frame(name = name, value = value)
first <- NULL
for (r in seq_len(repeats)) {
  set.seed(r)
  fit <- NULL
  elapsed <- system.time(fit <- tryCatch(fit_once(), error = function(e) e))[["elapsed"]]
  if (inherits(fit, "error")) {
    put(paste0("error_", r), 1)
    message("stepFlexmix failed: ", conditionMessage(fit))
    next
  }
  put(paste0("loglik_", r), as.numeric(logLik(fit)))
  put(paste0("seconds_", r), elapsed)
  if (is.null(first)) first <- fit
}
params <- data.frame(component = integer(0), part = character(0), term = character(0),
                     value = numeric(0))
if (!is.null(first)) {
  ll <- logLik(first)
  put("loglik", as.numeric(ll))
  put("df", attr(ll, "df"))
  put("k_found", first@k)
  put("iterations", first@iter)
  put("converged", as.integer(first@converged))
  add <- function(component, part, term, value) {
    params <<- rbind(params, data.frame(component = component, part = part, term = term,
                                        value = value))
  }
  p <- parameters(first)  # rows coef.<term> and, for gaussian, sigma; one column per component
  pri <- prior(first)
  g <- if (conc_arg == "none") NULL else parameters(first, which = "concomitant")
  for (j in seq_len(first@k)) {
    for (r in rownames(p)) {
      if (r == "sigma") add(j, "sigma", "", p[r, j]) else add(j, "coef", sub("^coef\\.", "", r), p[r, j])
    }
    add(j, "prior", "", pri[j])
    if (!is.null(g)) for (r in rownames(g)) add(j, "gate", r, g[r, j])
  }
}
write.csv(do.call(rbind, rows), paste0(out, "_summary.csv"), row.names = FALSE)
write.csv(params, paste0(out, "_params.csv"), row.names = FALSE)
