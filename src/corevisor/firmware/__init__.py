"""What the machine tells firmware and guests about itself: the fw_cfg items (fw_cfg.py).

SeaBIOS loading and the reset-vector set-up belong here too when they are built; they
will add their files (etc/..., bootorder entries) through the same fw_cfg device.
"""
