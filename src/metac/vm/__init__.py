"""vm service: virtual machines (QEMU) whose kernel, disks, NICs and serial ports are
capabilities from any node (paper section 7.1: VMLauncher, LaunchConfiguration, VM)."""
