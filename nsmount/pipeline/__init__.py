"""One VM end to end, and the worker processes that run many under deadlines."""
