# nanoGPT's train_shakespeare_char GPU recipe, in this code: a character-level GPT on
# tinyshakespeare (first 90% train, last 10% validation). nanoGPT's README: about 3 minutes on an
# A100, best validation loss 1.4697; the model overfits this small dataset, so nanoGPT saves a
# checkpoint only when validation improves (here best.pt is that checkpoint). This code's own run of
# it is in RESULTS.md. 10.8M parameters; 5,000 steps x 64 x 256 = 82M tokens; 71 MFLOPs/token,
# ~5.8e15 FLOPs.
#   python prepare.py config/shakespeare_char.py && python train.py config/shakespeare_char.py

# data (prepare.py): tinyshakespeare, character-level
dataset = "tinyshakespeare_char"
# downloaded once into data/tinyshakespeare_char/input.txt; offline, put a copy there first
source = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
tokenizer = "char"

# model: GPT-2 style, no biases, as nanoGPT's defaults
out_dir = "out-shakespeare-char"
preset = "classic"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
bias = False

# training
batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr_ratio = 0.1  # nanoGPT's min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99        # nanoGPT: "make a bit bigger because number of tokens per iter is small"
weight_decay = 0.1
eval_interval = 250
eval_iters = 200
log_interval = 10
