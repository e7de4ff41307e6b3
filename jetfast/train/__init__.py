"""Training: the loop both stages run (:mod:`.loop`) and the two stages, the VAE (:mod:`.vae`)
and the code Transformer (:mod:`.gpt`)."""
