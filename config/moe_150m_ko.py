# The Korean MoE article, "150M size SLM built with single GPU": a DeepSeek-style MoE
# model pretrained from scratch on Korean Wikipedia with a SentencePiece tokenizer on one RTX 3090.
# 145.6M parameters in total, 64.9M active per token (48.5M active non-embedding): 12 layers, the
# first dense, then shared expert + 16 fine-grained routed experts, top-2, balanced by DeepSeek-V3's
# bias. 366 MFLOPs per token; 1B tokens ~ 3.7e17 FLOPs. At 30% MFU of the 3090's 71 TFLOP/s that is
# about 5 hours per billion tokens (an estimate, not measured here).
# The article stopped at epoch 5 because validation perplexity rose after epoch 4:
# early_stop_patience keeps best.pt at the best evaluation and stops once it stops improving.
#   python prepare.py config/moe_150m_ko.py && python train.py config/moe_150m_ko.py
# Then the article's chatbot, prompt masked (sft.py's default): python sft.py config/moe_150m_ko.py
#   --init_from=out-moe-150m-ko --out_dir=out-moe-150m-ko-sft --sources=<Korean chat .jsonl, hf:...>

# data (prepare.py): Korean Wikipedia from the Hugging Face Hub, and SentencePiece 32k over MeCab's
# morphemes, as the article built it (mecab-ko, in requirements-extra.txt, brings its dictionary).
# What the hook changes: no piece crosses a morpheme boundary inside a word (대통령|은, 보호|하|기), so the
# vocabulary holds stems and endings rather than whole inflected words, and each morpheme is encoded
# on its own, so decoding still gives the text as written. It costs tokens: 23% more per byte on the
# Korean constitution at a 2,000-piece vocabulary (RESULTS.md, Korean).
dataset = "kowiki_mecab_sp32k"
source = "hf:wikimedia/wikipedia"
hf_subset = "20231101.ko"
tokenizer = "sp"
sp_vocab_size = 32000
pretokenize = "tokenizer:mecab_morphemes"

# model
out_dir = "out-moe-150m-ko"
preset = "modern"
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
moe_experts = 16
moe_top_k = 2
moe_shared_experts = 1
moe_expert_hidden = 512
moe_first_dense = 1

# training
batch_size = 16
batch_tokens = 131072
max_iters = 0
max_tokens = 2_000_000_000
learning_rate = 6e-4
beta2 = 0.95
warmup_iters = 500
eval_interval = 500
eval_iters = 50
early_stop_patience = 6
