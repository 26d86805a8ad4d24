# nanoGPT's documented CPU recipe for char-level tinyshakespeare, in this code (issue 8's baseline).
# Source: nanoGPT README, "I only have a macbook" section:
#   python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
#     --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
#     --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# with the rest from nanoGPT's config/train_shakespeare_char.py. nanoGPT reports val loss ~1.88
# (issue 8: 1.886 in about 97 s on the 2-core machine).
#   python prepare.py config/baseline_cpu.py && python train.py config/baseline_cpu.py

# data (prepare.py): one .txt file, split at its last 10% (val_fraction default 0.1), as nanoGPT's
# data/shakespeare_char/prepare.py does; character-level vocabulary
dataset = "tinyshakespeare_char"
# downloaded once into data/tinyshakespeare_char/input.txt; offline, put a copy there first
source = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
tokenizer = "char"

out_dir = "out-baseline-cpu"

# model: README command --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --dropout=0.0;
# train_shakespeare_char.py/model defaults: bias=False, GPT-2 style (learned positions, LayerNorm,
# GELU, tied head) = preset classic
preset = "classic"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
bias = False

# training: README command --batch_size=12 --max_iters=2000 --lr_decay_iters=2000
# no gradient accumulation (train_shakespeare_char.py: gradient_accumulation_steps = 1)
batch_size = 12
max_iters = 2000
optimizer = "adamw"
learning_rate = 1e-3         # train_shakespeare_char.py
min_lr_ratio = 0.1           # train_shakespeare_char.py: min_lr = 1e-4 = learning_rate / 10
# nanoGPT: linear warmup, cosine decay to min_lr at lr_decay_iters (= max_iters here)
lr_schedule = "cosine"
warmup_iters = 100           # train_shakespeare_char.py
beta1 = 0.9                  # nanoGPT default
beta2 = 0.99                 # train_shakespeare_char.py
weight_decay = 0.1           # nanoGPT default
grad_clip = 1.0              # nanoGPT default

# evaluation and logging
eval_interval = 250          # train_shakespeare_char.py
eval_iters = 20              # README command --eval_iters=20
log_interval = 1             # README command --log_interval=1
sample_tokens = 0            # nanoGPT's train.py prints no samples while training

# system: README command --device=cpu --compile=False; fp32 on the CPU
device = "cpu"
compile = "False"
dtype = "float32"
seed = 1337                  # nanoGPT: torch.manual_seed(1337 + seed_offset)
