"""``nsmount serve``: the resident service.

The one per-VM pipeline (:func:`nsmount.reconnect.reconnect`, forked workers with
per-VM deadlines) driven by events instead of by a command: host mount events
(:mod:`.mountwatch`), device uevents (:mod:`.uevents`), VM starts and exits
(:mod:`.lifecycle`) and requests on a local socket (:mod:`.server`,
:mod:`.protocol`).  :mod:`.serve` ties them together on one single-threaded epoll
loop (:mod:`.loop`); the work for VMs runs in forked jobs (:mod:`.jobs`) so the
loop never blocks on a VM.
"""
