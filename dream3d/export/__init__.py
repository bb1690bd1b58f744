"""From a trained run to files: meshes, splats and the orbit video (files.py), and texture refinement of the
exported mesh (refine.py)."""
