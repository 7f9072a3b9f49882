from megatron.core.models.gpt.gpt_model import GPTModel, LanguageModelEmbedding
