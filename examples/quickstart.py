"""Quick start: attach UniPELT (adapter + prefix + LoRA, gated) to the embedded MiniLM and train a few steps.

Runs in about a minute on 2 CPU cores, offline. The full experiment runner is `unipelt` (Hydra).
"""
import torch

from unipelt import PeltModel, load_encoder, load_tokenizer, load_task, preset, save_task

texts = ["a gripping, funny and moving film", "an utter bore from start to finish", "one of the best of the year",
         "the plot never comes together and the jokes fall flat", "warm, clever and beautifully acted",
         "a tedious mess", "I loved every minute", "painfully dull and far too long"]
labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])

tokenizer = load_tokenizer("minilm")
batch = tokenizer(texts, padding=True, return_tensors="pt")
model = PeltModel(load_encoder("minilm"))
model.add_task("sentiment", preset("unipelt_apl"), num_labels=2)
counts = model.parameter_counts()
print(f"trainable {counts['trainable']:,} of {counts['encoder']:,} encoder parameters ({counts['percent']:.2f}%)")

torch.manual_seed(42)
optimizer = torch.optim.AdamW(model.trainable_named_parameters().values(), lr=5e-4)
model.train()
for step in range(30):
    optimizer.zero_grad()
    out = model(batch["input_ids"], batch["attention_mask"], labels=labels)
    out.loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 29:
        print(f"step {step:2d}  loss {out.loss.item():.4f}")

model.eval()
with torch.no_grad():
    logits = model(batch["input_ids"], batch["attention_mask"]).logits
print("accuracy on the training sentences:", (logits.argmax(-1) == labels).float().mean().item())
for name, per_layer in model.gate_values().items():
    print(f"gate {name:12s}", " ".join(f"{v.mean():.2f}" for v in per_layer))

folder = save_task(model, "outputs/quickstart_sentiment")
fresh = PeltModel(load_encoder("minilm")).eval()
load_task(fresh, folder)
with torch.no_grad():
    same = torch.equal(fresh(batch["input_ids"], batch["attention_mask"]).logits, logits)
print(f"saved to {folder}; reloaded onto a fresh encoder, identical logits: {same}")
