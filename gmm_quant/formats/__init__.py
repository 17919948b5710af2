"""File formats: the ``.gqz`` file (``storage``) and the ONNX converter and export."""
