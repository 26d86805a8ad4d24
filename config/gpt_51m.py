# The 51M article, "Training A Not-So-Large Language Model for $50" (2023; its code:
# https://github.com/shionhonda/generative-ai): GPT-2 architecture
# with 8 layers, 8 heads and 512 dims on BookCorpus with a BPE tokenizer, chosen from an isoFLOP
# curve at N = 50M, D = 1.1B tokens. Here with tiktoken's GPT-2 BPE (vocabulary 50,257, tied
# embeddings). 51,213,824 parameters; 1.1B tokens; 6ND ~ 3.4e17 FLOPs, the article's 320 PFLOPs.
# The article: under a day on one V100 (not measured here). At 40% MFU of the V100's 125 TFLOP/s
# that would be about 2 hours; train.py prints the measured tokens/s, MFU and ETA.
#   python prepare.py config/gpt_51m.py && python train.py config/gpt_51m.py

# data (prepare.py): BookCorpus from the Hugging Face Hub, streamed. The canonical repository
# (bookcorpus/bookcorpus) loads through a script, which datasets 4 refuses; rojagtap/bookcorpus
# holds the same 74M sentences as Parquet (column "text", split "train"), which needs none
dataset = "bookcorpus_gpt2"
source = "hf:rojagtap/bookcorpus"
tokenizer = "gpt2"

# model
out_dir = "out-gpt-51m"
preset = "classic"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 512

# training: 0.25M-token batches, 4,196 steps
batch_size = 32
batch_tokens = 262144
max_iters = 0
max_tokens = 1_100_000_000
learning_rate = 6e-4
beta2 = 0.95
warmup_iters = 200
eval_interval = 500
eval_iters = 100
