# The R side of docs/coming_from_r.md: the motorcycle data fitted with flexmix and
# mixtools. Its output is pasted into that page as a literal block; rerun with
#   Rscript docs/r/coming_from_r.R
suppressPackageStartupMessages({
  library(MASS)
  library(flexmix)
  library(mixtools)
})
data(mcycle)
cat(sprintf("R %s, flexmix %s, mixtools %s\n", getRversion(),
            packageVersion("flexmix"), packageVersion("mixtools")))

# 1. A mixture of experts: 3 linear experts, a softmax gate on times (concomitant)
set.seed(1)
moe <- stepFlexmix(accel ~ times, data = mcycle, k = 3, nrep = 10,
                   concomitant = FLXPmultinom(~times), verbose = FALSE)
cat("\n## flexmix: accel ~ times, k = 3, concomitant = FLXPmultinom(~times)\n")
print(logLik(moe))
cat(sprintf("BIC %.3f  AIC %.3f\n", BIC(moe), AIC(moe)))
print(parameters(moe))

# 2. The same experts with constant weights: a mixture of regressions
set.seed(1)
mix <- stepFlexmix(accel ~ times, data = mcycle, k = 3, nrep = 10, verbose = FALSE)
cat("\n## flexmix: accel ~ times, k = 3, constant weights\n")
print(logLik(mix))

set.seed(1)
best <- NULL
for (r in 1:10) {
  invisible(capture.output(fit <- try(regmixEM(mcycle$accel, mcycle$times, k = 3),
                                      silent = TRUE)))
  if (!inherits(fit, "try-error") && (is.null(best) || fit$loglik > best$loglik)) best <- fit
}
cat("\n## mixtools: regmixEM(accel, times, k = 3), best of 10 runs\n")
cat(sprintf("log Lik. %.3f\n", best$loglik))

# 3. Choosing k: stepFlexmix over k = 1..4, BIC
set.seed(1)
steps <- stepFlexmix(accel ~ times, data = mcycle, k = 1:4, nrep = 10,
                     concomitant = FLXPmultinom(~times), verbose = FALSE)
cat("\n## stepFlexmix(k = 1:4): BIC by k\n")
print(round(sapply(steps@models, BIC), 2))
