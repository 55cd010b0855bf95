//! Black-box tests of the built agent binary (harness to come).
