"""The web app (``dream3d web``): a Gradio page over dream3d.api, with a one-run-at-a-time job queue."""
