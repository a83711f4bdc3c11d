"""Fine-tuning methods (PEFT adapters on the DT's GPT-2 blocks) and EVA initialisation."""
