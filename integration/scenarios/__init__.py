"""Scenario bodies for the integration tests ("tests as code", issue 9).

Every public function here runs INSIDE a fresh sandbox (tests/sandbox.py) as its fake
hypervisor host: it starts its own VMs (``vmhelpers.start_vm``), damages or attacks them,
runs nsmount, and either asserts there (and prints ``OK``) or prints one JSON line of
observations.  The pytest files next to this package hand the function to
``harness.in_sandbox``, which sends only ``from scenarios.X import f; f(args)`` into the
sandbox, and assert on the result.

=============  =========================================================  ==============
module         scenarios                                                  test file
=============  =========================================================  ==============
launch         ``nsmount exec``: minimal /dev, symlink chains, QEMU on    test_launch
               hugepages, bad input, dry run
repair         inspect/repair/hotplug/run-in/propagation on running VMs   test_repair
cli_ops        exit codes and output of the command line                  test_cli_ops
reconnect      reconnect at scale, bad input, crash mid-run, hidden       test_reconnect
               mounts
hostile        planted symlinks/mounts/FIFOs; ``CASES`` table             test_hostile
trust          hostile VMs at the trust boundaries (issue 8)              test_hostile_trust
concurrency    concurrent repair and reconnect runs                       test_concurrency
crash          crash injection after every apply step                     test_crash
libvirt        the real libvirt daemon, its reconnect and the hook        test_libvirt
serve          ``nsmount serve``: kernel events end to end, socket        test_serve
               abuse, a flapping mount
rootless       ``nsmount exec`` by an unprivileged user: stand-in,        test_rootless
               errors, QEMU, crash per rootless step, ``launch()``
fdpass         ``device add --fd-to-qmp`` and ``fdpass.pass_device``      test_fdpass_qmp
               into a real QEMU (root and rootless VMs)
=============  =========================================================  ==============

Shared helpers: ``integration/vmhelpers.py`` (start a VM, also as an unprivileged user,
run nsmount, look into a VM, hugetlbfs as a VM sees it, loop devices) and ``support.py``
here (fake /etc, snapshots, the Guard, raw nsmount runs).
"""
