"""Read the host, observe a VM, plan, apply: the engine every face shares."""
