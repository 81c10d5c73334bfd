"""`make demo`: what lazypull does, end to end, on embedded defaults."""
