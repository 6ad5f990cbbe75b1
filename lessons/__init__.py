"""The teaching stages, one module per stage; each imports pieces of the stages before it."""
