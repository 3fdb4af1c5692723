"""Evaluations as library functions: `t2i` (the small world's GenEval, judged by `data.judge`) and `vae`
(reconstruction quality beside the same-size bicubic baseline, and the encode/decode helpers behind
`qwenimage-jax reconstruct`). Commands, recipes, notebooks and tests call these; nothing here imports training."""
