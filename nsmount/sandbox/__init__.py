"""A throwaway fake hypervisor host (private mount + PID namespace) for the demo and the tests."""
