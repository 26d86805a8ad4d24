# The 350M article (untitled; it opens "What is the most powerful LLM that can realistically be
# trained for less than $100?"): GPT-3 Medium's shape (24 layers, 16 heads, 1,024 dims) with RoPE,
# context 2,048, batches of 256 x 2,048 = 0.5M tokens, max lr 3e-4 with linear warmup and cosine
# decay, on FineWeb-Edu sample-10BT with the GPT-2 tokenizer.
# 354M parameters (tied embeddings); 10B tokens; ~2.7e19 FLOPs.
# The article: 55 hours at 50,000 tokens/s on one GPU, once the attention kept its flash path
# (not measured here). Spread it over a node with
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt_350m.py

# data (prepare.py)
dataset = "fineweb_edu_10bt_gpt2"
source = "hf:HuggingFaceFW/fineweb-edu"
hf_subset = "sample-10BT"
tokenizer = "gpt2"

# model
out_dir = "out-gpt-350m"
preset = "classic"
pos_emb = "rope"
bias = False
n_layer = 24
n_head = 16
n_embd = 1024
block_size = 2048

# training: the global batch is fixed in tokens; accumulation makes up whatever the GPUs cannot hold
batch_size = 16
batch_tokens = 524288
max_iters = 0
max_tokens = 10_000_000_000
learning_rate = 3e-4
beta2 = 0.95
warmup_iters = 715  # GPT-3: warmup over the first 375M tokens
eval_interval = 1000
eval_iters = 50
