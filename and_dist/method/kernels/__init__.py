"""Speed kernels for the method's two passes over the bank, each checked against the plain torch
maths it replaces: the loss's softmax as attention (attention.py, with the Triton kernel in
fused_attention.py) and discovery's entropy and neighbours in one Triton pass (fused_discovery.py)."""
