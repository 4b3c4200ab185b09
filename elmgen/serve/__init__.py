"""`elmgen serve`: a browser demo (Gradio) over trained LM runs; gradio is imported only when the app is built."""

from elmgen.serve.app import Run, build_app, model_label, sample_command_line, sample_settings, serve
