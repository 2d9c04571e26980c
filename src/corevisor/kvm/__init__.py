"""The KVM layer: ABI bindings (bindings.py) and typed ioctl wrappers (ioctls.py)."""
