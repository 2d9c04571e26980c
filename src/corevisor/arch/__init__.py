"""Architecture-specific machine setup.

One subpackage per guest architecture (only x86_64 today). Each holds the guest-physical
memory map and the firmware-like tables a VMM must write before the first instruction
runs; nothing here issues ioctls or owns device state.
"""
