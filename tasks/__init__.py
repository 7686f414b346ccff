"""qatflow: a labelled dataset in, a verified int8 TorchScript model out.

One module per pipeline stage (prepare, train, qat, export, evaluate), each a plain function plus a
``python -m tasks.<stage>`` entry point that dvc.yaml calls.
"""
