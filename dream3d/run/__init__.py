"""One optimisation run: building the parts (build.py), the training cameras (camera_sampling.py), the loop
(loop.py), network-evaluation counts (nfe.py), stopping on a signal (stop.py) and the device (device.py)."""
