"""x86-64 guest setup: memory layout, boot parameters, MP table (and, elsewhere, CPU state).

layout.py holds only address constants; bootparams.py writes the PVH start_info and
multiboot info structures; mptable.py writes the Intel MP table. These modules write
bytes into GuestMemory and return addresses: setting registers is the builder's job.
"""
