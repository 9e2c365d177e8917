# Fit mixtools' hmeEM to tonedata (tuned ~ stretchratio) and export the data.
#
#   Rscript fit_hmeem.R OUTDIR
#
# Writes OUTDIR/tonedata.csv (stretchratio, tuned) and OUTDIR/hmeem.csv (name, value):
# hmeEM's log-likelihood, parameters and seconds. hmeEM fits two linear-Gaussian experts
# under a logistic gate on x (it handles k = 2 and one covariate only), started as in
# mixtools' own example: from regmixEM's fit with set.seed(100).
args <- commandArgs(trailingOnly = TRUE)
outdir <- args[1]
dir.create(outdir, showWarnings = FALSE, recursive = TRUE)
suppressPackageStartupMessages(library(mixtools))
env <- new.env()
data(tonedata, package = "mixtools", envir = env)
d <- as.data.frame(get("tonedata", envir = env))[c("stretchratio", "tuned")]
write.csv(d, file.path(outdir, "tonedata.csv"), row.names = FALSE)
set.seed(100)
t0 <- proc.time()[["elapsed"]]
invisible(capture.output({
  em <- regmixEM(d$tuned, d$stretchratio, k = 2)
  hme <- hmeEM(d$tuned, d$stretchratio, beta = em$beta)
}))
secs <- proc.time()[["elapsed"]] - t0
out <- data.frame(
  name = c("loglik", "seconds", "iterations", "restarts", "beta_0_1", "beta_1_1", "beta_0_2",
           "beta_1_2", "sigma_1", "sigma_2", "w_0", "w_1"),
  value = c(hme$loglik, secs, length(hme$all.loglik) - 1, hme$restarts, hme$beta[, 1],
            hme$beta[, 2], hme$sigma, hme$w)
)
write.csv(out, file.path(outdir, "hmeem.csv"), row.names = FALSE)
cat(sprintf("hmeEM log-likelihood %.4f in %.2f s (mixtools %s)\n", hme$loglik, secs,
            as.character(packageVersion("mixtools"))))
