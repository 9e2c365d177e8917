# Time R's own fits, each given as one R call, and report their log-likelihoods.
#
#   Rscript fit_calls.R CASES.csv DATADIR REPEATS OUT.csv
#
# CASES.csv has columns id, data and call: `data` names DATADIR/<data>.csv, read
# into `d`; `call` is an R expression of `d` (a stepFlexmix, glm, glm.nb, survreg
# or Mclust call). Each call runs REPEATS times with seeds 1, 2, ..., timed with
# system.time; OUT.csv gets one row per case: the seed-1 fit's logLik() and its
# "df" attribute, the median elapsed seconds, and the error message of a call that
# failed (then NA elsewhere).
args <- commandArgs(trailingOnly = TRUE)
cases <- read.csv(args[1], stringsAsFactors = FALSE)
datadir <- args[2]
repeats <- as.integer(args[3])
suppressPackageStartupMessages({
  library(flexmix)
  library(MASS)
  library(survival)
  library(mclust)
})
rows <- list()
for (i in seq_len(nrow(cases))) {
  d <- read.csv(file.path(datadir, paste0(cases$data[i], ".csv")))
  expr <- parse(text = cases$call[i])[[1]]
  ll <- NA_real_
  df <- NA_real_
  secs <- c()
  err <- ""
  for (r in seq_len(repeats)) {
    set.seed(r)
    fit <- NULL
    t <- system.time(fit <- tryCatch(eval(expr), error = function(e) e))[["elapsed"]]
    if (inherits(fit, "error")) {
      err <- conditionMessage(fit)
      break
    }
    secs <- c(secs, t)
    if (r == 1) {
      l <- logLik(fit)
      ll <- as.numeric(l)
      df <- attr(l, "df")
    }
  }
  rows[[i]] <- data.frame(id = cases$id[i], loglik = ll, df = df,
                          seconds = if (length(secs)) median(secs) else NA_real_,
                          error = gsub("[\r\n]", " ", err))
}
write.csv(do.call(rbind, rows), args[4], row.names = FALSE)
