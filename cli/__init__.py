"""The `lazypull` command line: argument parsing only; the work lives in the packages."""
