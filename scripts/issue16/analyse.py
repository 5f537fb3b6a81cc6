# Issue 16 diagnostic: bottleneck rank / logit spread / prediction entropy of teacher and student on whole views,
# masked views and local crops of 64 rows of a synthetic tour.  usage (repo root, PYTHONPATH=.):
#   python scripts/issue16/analyse.py RUN/stage1/last.ckpt [RUN/data/synth/tour.mp4]
import sys, torch, av, numpy as np, torch.nn.functional as F
from wtours.stages.video.module import VideoModule
from wtours.objectives.collapse import effective_rank
from wtours.objectives.dora import *
torch.set_num_threads(1)
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
from wtours.config import from_dict
from wtours.stages.video.config import VideoPretrainConfig
from wtours.config import load_config
cfg = load_config(VideoPretrainConfig, "configs/video/proof.yaml", [])
m = VideoModule(cfg)
m.load_state_dict(ck["state_dict"], strict=False)
# decode frames: clips of 4 frames stride 8 at 8 places
c = av.open(sys.argv[2] if len(sys.argv) > 2 else "runs/A_base/data/synth/tour.mp4"); fr = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
fr = [np.asarray(__import__("PIL.Image").Image.fromarray(x).resize((170, 96))) for x in fr]
starts = np.linspace(0, len(fr) - 40, 16).astype(int)
clips = torch.tensor(np.stack([np.stack([fr[s + 8 * t] for t in range(4)]) for s in starts])).permute(0, 1, 4, 2, 3).contiguous()
m.augment.generator.manual_seed(0); m.generator.manual_seed(0)
views = m.augment(clips)
g, loc = views.global_views, views.local_views
b, t = g.shape[:2]
obj = m.objective.dora
with torch.no_grad():
    out = m.teacher.forward_tracking(g.flatten(0, 1))
    tz = obj.teacher_head.bottleneck(out.cls)
    heads = sample_heads(m.generator, b, m.teacher.num_heads, 3, None)
    maps = track_objects(gather_frame0(out, b, t), clip_keys(out, b, t), heads, eps=0.05, iters=30)
    masks = binarise_maps(maps, "batch")
    masked = mask_views(g, masks, 8)
    m.student.eval()
    sz_full = obj.student_head.bottleneck(m.student(g.flatten(0, 1)))
    tz_full_teacher_backbone = tz
    sz_mask = obj.student_head.bottleneck(m.student(masked.flatten(0, 2)))
    sz_loc = obj.student_head.bottleneck(m.student(loc.flatten(0, 2)))
    tz_mask = obj.teacher_head.bottleneck(m.teacher(masked.flatten(0, 2)))
def stats(name, z, tau):
    lg = obj.teacher_head.prototypes(z)
    p = torch.softmax(lg / tau, -1)
    H = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    print(f"{name:28s} rank {effective_rank(F.normalize(z, dim=-1)).item():5.2f}  logit std over rows {(lg.std(0).mean()).item():.4f}  softmax(./{tau}) H {H:.3f}")
print(sys.argv[1], "step", ck.get("global_step"), "mask coverage", masks.float().mean().item())
stats("teacher  full views", tz, 0.02)
stats("teacher  masked views", tz_mask, 0.02)
stats("student  full views", sz_full, 0.1)
stats("student  masked views", sz_mask, 0.1)
stats("student  local crops", sz_loc, 0.1)
W = obj.teacher_head.last_layer.weight.detach()  # [C, Db] = g * v/|v|
zstar = torch.linalg.lstsq(W, torch.ones(W.shape[0], 1)).solution[:, 0]
zs = F.normalize(zstar, dim=0)
for name, z in [("teacher full", tz), ("student masked", sz_mask), ("student local", sz_loc)]:
    zn = F.normalize(z, dim=-1)
    print(f"{name:16s} cos(z, uniform dir) mean {(zn @ zs).mean():.3f} (abs {(zn @ zs).abs().mean():.3f});  logits of z*: std {(W @ zs).std():.4f} vs row std {(zn @ W.T).std(-1).mean():.4f}")
