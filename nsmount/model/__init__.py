"""Pure models and parsers: no syscalls that change anything, no root needed."""
