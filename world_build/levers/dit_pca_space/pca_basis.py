import sys, json, dataclasses, numpy as np, jax, jax.numpy as jnp
from qwenimage_jax import checkpoints
from qwenimage_jax.data.world_source import WorldSource
src_dir, dst, floor_ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
vae = checkpoints.load("vae", src_dir)
def images(n, seed, split):
    s = WorldSource(n, seed=seed, split=split, size=128)
    return np.stack([s[i]["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1.0
train = images(1024, 5, "train")
z = np.concatenate([np.asarray(vae.encode(train[i:i+32])) for i in range(0, 1024, 32)]).reshape(-1, 64).astype(np.float64)
m = z.mean(0); C = np.cov(z.T)
lam, V = np.linalg.eigh(C); order = np.argsort(lam)[::-1]; lam, V = lam[order], V[:, order]
R = V.T
std = np.sqrt(np.maximum(lam, lam.mean() * floor_ratio ** 2))
print("eig/mean:", np.round(lam / lam.mean(), 4).tolist())
p = jax.tree_util.tree_map(np.asarray, vae.params)
p = jax.tree_util.tree_map(lambda x: np.array(x, np.float64), p)
qk = p["quant_conv"]["kernel"]; qb = p["quant_conv"]["bias"]
qk[0, 0, :, :64] = qk[0, 0, :, :64] @ R.T; qb[:64] = qb[:64] @ R.T
pk = p["post_quant_conv"]["kernel"]
pk[0, 0] = R @ pk[0, 0]
p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), p)
cfg = dataclasses.replace(vae.vae_config, latents_mean=tuple(float(v) for v in R @ m), latents_std=tuple(float(v) for v in std))
checkpoints.export("vae", p, cfg, dst)
new = checkpoints.load("vae", dst)
held = images(32, 6, "heldout")
a = np.asarray(vae.decode(vae.encode(held))); b = np.asarray(new.decode(new.encode(held)))
print("recon max diff", np.abs(a - b).max())
zn = np.asarray(new.encode(held, normalize=True)).reshape(-1, 64)
print("normalized var per channel (first 8, last 8):", np.round(zn.var(0)[:8], 3), np.round(zn.var(0)[-8:], 3))
