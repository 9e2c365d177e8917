# Export the public data sets of bench/responses.py from R's packages to CSV.
#
#   Rscript export_responses.R OUTDIR
#
# One OUTDIR/<name>.csv per data set, numeric columns only, so that R and moekit
# read the very same numbers: a factor becomes 0/1 indicators of its levels after
# the first (R's treatment contrasts, named <factor><level number>), an ordered factor
# also keeps its level number as <factor>_code, and a censoring status becomes an
# event indicator (1: the time is exact, 0: right-censored).
args <- commandArgs(trailingOnly = TRUE)
outdir <- args[1]
dir.create(outdir, showWarnings = FALSE, recursive = TRUE)
suppressPackageStartupMessages({
  library(flexmix)
  library(MASS)
  library(survival)
})
env <- new.env()
get_data <- function(name, package) {
  data(list = name, package = package, envir = env)
  as.data.frame(get(name, envir = env))
}
dummies <- function(d, v) {
  f <- factor(d[[v]], ordered = FALSE)
  out <- sapply(levels(f)[-1], function(l) as.integer(f == l))
  out <- as.data.frame(matrix(out, nrow = nrow(d)))
  names(out) <- paste0(v, seq_along(levels(f))[-1])
  out
}

sets <- list()
bb <- get_data("betablocker", "flexmix")
sets$betablocker <- data.frame(Deaths = bb$Deaths, Total = bb$Total,
                               Center = as.integer(bb$Center),
                               Treated = as.integer(bb$Treatment == "Treated"))
fa <- get_data("faithful", "datasets")
sets$faithful <- fa[c("eruptions", "waiting")]
ir <- get_data("iris", "datasets")
sets$iris <- setNames(ir[1:4], c("SepalLength", "SepalWidth", "PetalLength", "PetalWidth"))
le <- get_data("leuk", "MASS")
sets$leuk <- data.frame(time = le$time, logwbc = log(le$wbc),
                        ag = as.integer(le$ag == "present"))
qu <- get_data("quine", "MASS")
sets$quine <- cbind(Days = qu$Days, dummies(qu, "Eth"), dummies(qu, "Sex"),
                    dummies(qu, "Age"), dummies(qu, "Lrn"))
ins <- get_data("Insurance", "MASS")
sets$Insurance <- cbind(Claims = ins$Claims, Holders = ins$Holders,
                        logHolders = log(ins$Holders), dummies(ins, "District"),
                        dummies(ins, "Group"), dummies(ins, "Age"),
                        Group_code = as.integer(ins$Group), Age_code = as.integer(ins$Age))
lu <- as.data.frame(survival::lung)
sets$lung <- data.frame(time = lu$time, event = as.integer(lu$status == 2),
                        age = lu$age, female = as.integer(lu$sex == 2))
for (name in names(sets)) {
  d <- sets[[name]]
  write.csv(d, file.path(outdir, paste0(name, ".csv")), row.names = FALSE)
  cat(sprintf("%s: %d rows, columns %s\n", name, nrow(d), paste(names(d), collapse = ", ")))
}
