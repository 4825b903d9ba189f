"""The Jasper student (arXiv 2412.19048, sec. 2.1): a Qwen2 text encoder, a SigLIP vision tower, a parameter-free
pooler that turns image patches into text-width tokens, and four Matryoshka heads (FC1..FC4 = 12288/1024/512/256).

Written directly in torch; loads real safetensors checkpoints key-for-key (modules are named after the checkpoint
keys, so loading needs at most a prefix, never a key map).
"""

# ==== text side (owner: helper "model"; others: do not edit) ====
# ==== end text side ====

# ==== vision side (owner: helper "vision"; others: do not edit) ====
# ==== end vision side ====

# ==== Jasper student (owner: helper "model"; helper "vision" may edit after .coord/model_text_done exists) ====
# ==== end Jasper student ====
