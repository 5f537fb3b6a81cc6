"""Quick probe: leave-one-sequence-out kNN patch-label retrieval on the synthetic YTVOS-layout set (categories),
mIoU over background + categories. usage: probe.py DATA_ROOT SPEC [SPEC...]"""
import json, sys
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from wtours.models.weights import load_backbone
torch.set_num_threads(1)
root = Path(sys.argv[1]) / "ytvos/train"
meta = json.load(open(root / "meta.json"))["videos"]
cats = sorted({o["category"] for v in meta.values() for o in v["objects"].values()})
H, W, P = 64, 112, 8
imgs, labs, seqs = [], [], []
for si, (vid, v) in enumerate(sorted(meta.items())):
    idmap = {int(k): 1 + cats.index(o["category"]) for k, o in v["objects"].items()}
    for f in sorted((root / "Annotations" / vid).glob("*.png")):
        im = Image.open(root / "JPEGImages" / vid / (f.stem + ".jpg")).convert("RGB").resize((W, H), Image.BILINEAR)
        a = np.array(Image.open(f))
        lab = np.vectorize(lambda x: idmap.get(int(x), 0))(a)
        lab = np.array(Image.fromarray(lab.astype(np.uint8)).resize((W // P, H // P), Image.NEAREST))
        imgs.append(np.asarray(im)); labs.append(lab.reshape(-1)); seqs.append(si)
x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
labs = torch.tensor(np.stack(labs)).long(); seqs = torch.tensor(seqs)
ncls = 1 + len(cats)
for spec in sys.argv[2:]:
    m, _ = load_backbone(spec, arch="vit_nano_patch8_64")
    with torch.no_grad():
        tok = m.forward_features(x) if not hasattr(m, "dynamic_img_size") else None
        m.dynamic_img_size = True
        tok = m.forward_features(x)[:, m.num_prefix_tokens:]
    feats = F.normalize(tok, dim=-1)  # [F, N, D]
    res = []
    for k in (5,):
        inter = torch.zeros(ncls); union = torch.zeros(ncls)
        for s in seqs.unique():
            q = feats[seqs == s].reshape(-1, feats.shape[-1]); ql = labs[seqs == s].reshape(-1)
            db = feats[seqs != s].reshape(-1, feats.shape[-1]); dl = labs[seqs != s].reshape(-1)
            nn_idx = (q @ db.T).topk(k, dim=-1).indices
            votes = F.one_hot(dl[nn_idx], ncls).sum(1)
            pred = votes.argmax(-1)
            for c in range(ncls):
                inter[c] += ((pred == c) & (ql == c)).sum(); union[c] += ((pred == c) | (ql == c)).sum()
        iou = inter / union.clamp_min(1)
        res.append(f"kNN{k} mIoU {100 * iou[union > 0].mean():.1f} (fg {100 * iou[1:][union[1:] > 0].mean():.1f})")
    print(spec, *res, flush=True)
