"""The thin typed syscall layer: ctypes wrappers, feature probes, namespace entry.

Everything here raises plain ``OSError`` with the real errno and the path; the
translation into nsmount's own exceptions happens once, in the front ends.
"""
