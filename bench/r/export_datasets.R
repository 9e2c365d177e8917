# Export the public data sets of bench/real_data.py from R's packages to CSV.
#
#   Rscript export_datasets.R OUTDIR
#
# One OUTDIR/<name>.csv per data set, numeric columns only: factors become 0/1
# indicators of their second level (bioChemists' fem = Women, mar = Married) and
# label columns (company, country) are left out, so that flexmix and moekit read
# the very same numbers from the very same file.
args <- commandArgs(trailingOnly = TRUE)
outdir <- args[1]
dir.create(outdir, showWarnings = FALSE, recursive = TRUE)
suppressPackageStartupMessages({
  library(flexmix)
  library(mixtools)
  library(MASS)
})
env <- new.env()
get_data <- function(name, package) {
  data(list = name, package = package, envir = env)
  get(name, envir = env)
}
numeric_only <- function(d) {
  for (v in names(d)) {
    if (is.factor(d[[v]]) && nlevels(d[[v]]) == 2) d[[v]] <- as.integer(d[[v]]) - 1L
  }
  d[vapply(d, is.numeric, logical(1))]
}
sets <- list(
  NPreg = c("flexmix", "x", "yn", "yp"),
  patent = c("flexmix", "Patents", "lgRD", "RDS"),
  fabricfault = c("flexmix", "Length", "Faults"),
  bioChemists = c("flexmix", "art", "fem", "mar", "kid5", "phd", "ment"),
  NOdata = c("mixtools", "NO", "Equivalence"),
  tonedata = c("mixtools", "stretchratio", "tuned"),
  CO2data = c("mixtools", "GNP", "CO2"),
  mcycle = c("MASS", "times", "accel"),
  GAGurine = c("MASS", "Age", "GAG")
)
for (name in names(sets)) {
  spec <- sets[[name]]
  d <- numeric_only(as.data.frame(get_data(name, spec[1]))[spec[-1]])
  write.csv(d, file.path(outdir, paste0(name, ".csv")), row.names = FALSE)
  cat(sprintf("%s (%s): %d rows, columns %s\n", name, spec[1], nrow(d),
              paste(names(d), collapse = ", ")))
}
