# `camp finetune configs/finetune_qlora.py [key=value ...]`: QLoRA on the newest `camp run`'s base model.
# XTuner-style: plain assignments to the fields of course_lib.finetune.FinetuneConfig (a misspelt key is an error).
model = ""                                    # a Llama-layout folder with tokenizer.json; "" = newest runs/*/pretrain/model
data = ["self_cognition", "tool_use", "reading"]   # synthetic tasks (evaluated on held-out splits) and/or JSONL files
method = "qlora"                              # full | lora | qlora
r, alpha, dropout = 8, 16, 0.0
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
steps, batch_size, max_length = 1000, 8, 256
lr, warmup_steps = 1e-2, 10
n_train, n_test = 2000, 50
output = "runs/finetune-qlora"
