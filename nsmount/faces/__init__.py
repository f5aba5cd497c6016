"""The faces over the one pipeline: launcher, repair, reconnect, hook, propagation, spec."""
