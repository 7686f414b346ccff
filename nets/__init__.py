"""Your own architectures. `train.model.family: nets.<file>:<callable>` builds the model from a file
here: the callable is given num_classes=K, input_shape=[...] when it takes that parameter, and
train.model.kwargs; it returns an nn.Module mapping (N, *input_shape) float32 to (N, K) logits.
README: "Your own model"."""
