"""Where nsmount's knowledge of a VM comes from: launch records, locks, pinned
targets, spec sources, and the untrusted state files they are read from."""
