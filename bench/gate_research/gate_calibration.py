"""Scope-gate calibration study.  Run:  .venv/bin/python bench/gate_research/gate_calibration.py
Dev items only (0..7999).  Eval packs: N=100 at offsets 0,1000,..,7000.  Constants of every rule are fitted
ONCE on disjoint 'train' packs (offsets 500,1500,..,7500) of BOTH datasets jointly, then frozen.
"""
import json, os, sys, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enc, templates as T

DATA = os.environ.get('LKS_DATA_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data'))
DSETS = ['zsre', 'counterfact']
N = 100
EVAL_OFF = [k * 1000 for k in range(8)]
TRAIN_OFF = [k * 1000 + 500 for k in range(8)]
TAU_SAME = 0.70      # probe / other-fact prompt with cos(., p) >= TAU_SAME is treated as "same relation" and dropped
PARA_MIN, LOC_MAX = 0.90, 0.05

def mask(t, s): return t.replace(s, 'X')
def isq(t): return t.rstrip().endswith('?')

PQ = enc.encode_cached(T.PROBES_Q); PS = enc.encode_cached(T.PROBES_S)

def load(ds):
    d = json.load(open(f'{DATA}/{ds}.json'))[:8000]          # dev only
    P = enc.encode_cached([mask(x['prompt'], x['subject']) for x in d])
    G = enc.encode_cached([mask(x['generality'], x['subject']) for x in d])
    L = enc.encode_cached([mask(x['locality']['prompt'], x['subject']) for x in d])
    return d, P, G, L

def pack_features(d, P, G, L, off, n):
    """Per-fact features for a pack of n facts (only fact fields + generated templates are used for
    calibration; G/L are the held-out test queries)."""
    idx = np.arange(off, off + n)
    p_txt = [mask(d[i]['prompt'], d[i]['subject']) for i in idx]
    Pp, Gq, Lq = P[idx], G[idx], L[idx]
    pq = np.array([isq(t) for t in p_txt])
    PR = np.where(pq[:, None, None], PQ[None], PS[None])                 # style-matched probes (n,30,384)
    spp = np.einsum('nkd,nd->nk', PR, Pp)                                 # probe vs prompt
    keep = spp < TAU_SAME
    # positive variants of p
    var_txt = [T.positive_variants(t) for t in p_txt]
    flat = [v for vs in var_txt for v in vs]
    VE = enc.encode_cached(flat) if flat else np.zeros((0, 384), np.float32)
    own = np.repeat(np.arange(n), [len(v) for v in var_txt])
    vsim = (VE * Pp[own]).sum(1)                                          # variant vs p
    # other facts in pack
    S_pp = Pp @ Pp.T
    other_ok = (S_pp < TAU_SAME) & ~np.eye(n, dtype=bool)
    F = {'pq': pq, 'spp': spp, 'keep': keep, 'vsim': vsim, 'own': own, 'other_ok': other_ok, 'S_pp': S_pp}
    for name, Q in (('g', Gq), ('l', Lq)):
        qq = np.array([isq(mask(d[i]['generality'] if name == 'g' else d[i]['locality']['prompt'], d[i]['subject'])) for i in idx])
        c = (Q * Pp).sum(1)
        cv_all = (VE * Q[own]).sum(1)
        cv = c.copy(); np.maximum.at(cv, own, cv_all)
        sq = np.einsum('nkd,nd->nk', PR, Q)
        mp = np.where(keep, sq, -1).max(1)
        PRq = np.where(qq[:, None, None], PQ[None], PS[None])
        rq = np.sort(np.einsum('nkd,nd->nk', PRq, Q), 1)[:, -5:].mean(1)
        so = Q @ Pp.T
        mo = np.where(other_ok, so, -1).max(1)
        mu = np.where(keep, spp, np.nan); 
        F[name] = dict(c=c, cv=cv, mp=mp, mo=mo, rq=rq, qq=qq, mu=np.nanmean(mu, 1), sd=np.nanstd(mu, 1) + 1e-3,
                       qlen=np.array([len(mask(d[i]['generality'] if name == 'g' else d[i]['locality']['prompt'], d[i]['subject']).split()) for i in idx]))
    F['rp'] = np.sort(spp, 1)[:, -5:].mean(1)
    F['plen'] = np.array([len(t.split()) for t in p_txt])
    return F

# ---------------- rules: each returns (s_para, s_loc) per pack; open iff s >= t ----------------
def pooled_probe(F):   return F['spp'][F['keep']]
def rule_raw(F, th=None):  return F['g']['c'], F['l']['c']
def rule_style(F, delta):  # threshold shifted down by delta for statement-style prompts
    sh = np.where(F['pq'], 0.0, delta); return F['g']['c'] + sh, F['l']['c'] + sh
def rule_probe_q(F, a):
    b = np.quantile(pooled_probe(F), a); return F['g']['c'] - b, F['l']['c'] - b
def rule_z(F, _=None):
    return (F['g']['c'] - F['g']['mu']) / F['g']['sd'], (F['l']['c'] - F['l']['mu']) / F['l']['sd']
def rule_nn_probe(F, _=None): return F['g']['c'] - F['g']['mp'], F['l']['c'] - F['l']['mp']
def rule_variants_max(F, _=None): return F['g']['cv'], F['l']['cv']
def rule_var_probe(F, lam):
    b = lam * np.quantile(F['vsim'], 0.1) + (1 - lam) * np.quantile(pooled_probe(F), 0.95)
    return F['g']['c'] - b, F['l']['c'] - b
def rule_others_q(F, a):
    v = F['S_pp'][F['other_ok']]; b = np.quantile(v, a) if v.size else 0.0
    return F['g']['c'] - b, F['l']['c'] - b
def rule_nn_all(F, _=None):
    return F['g']['c'] - np.maximum(F['g']['mp'], F['g']['mo']), F['l']['c'] - np.maximum(F['l']['mp'], F['l']['mo'])
def rule_csls(F, _=None):
    return F['g']['c'] - 0.5 * (F['rp'] + F['g']['rq']), F['l']['c'] - 0.5 * (F['rp'] + F['l']['rq'])

def rule_csls_style(F, delta):
    a, b = rule_csls(F); sh = np.where(F['pq'], 0.0, delta); return a + sh, b + sh

LR_NAMES = ['c', 'cv', 'c-mp', 'c-mo', 'c-rp', 'c-rq', 'z', 'p_is_q', 'q_is_q', 'same_style', 'log_len_ratio']
def lr_feats(F, k):
    f = F[k]
    return np.stack([f['c'], f['cv'], f['c'] - f['mp'], f['c'] - f['mo'], f['c'] - F['rp'], f['c'] - f['rq'],
                     (f['c'] - f['mu']) / f['sd'], F['pq'].astype(float), f['qq'].astype(float),
                     (F['pq'] == f['qq']).astype(float), np.log(f['qlen'] / F['plen'])], 1)

class LR:
    def fit(self, X, y, l2=1e-3):
        self.m, self.s = X.mean(0), X.std(0) + 1e-6
        Xt = torch.tensor((X - self.m) / self.s, dtype=torch.float64); yt = torch.tensor(y, dtype=torch.float64)
        w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=500)
        def clos():
            opt.zero_grad(); z = Xt @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + l2 * (w[:-1] ** 2).sum()
            loss.backward(); return loss
        opt.step(clos); self.w = w.detach().numpy(); return self
    def __call__(self, X): return ((X - self.m) / self.s) @ self.w[:-1] + self.w[-1]

# ---------------- evaluation helpers ----------------
def rates(scores, t):
    """scores: list over (ds) of list over packs of (sg, sl). -> per ds (para_open, loc_open) averaged over packs"""
    return [(np.mean([(sg >= t).mean() for sg, sl in ps]), np.mean([(sl >= t).mean() for sg, sl in ps])) for ps in scores]

def objective(rs):
    short = sum(max(0, PARA_MIN - a) + max(0, b - LOC_MAX) for a, b in rs)
    return (short, -sum(a - b for a, b in rs))

def fit_t(scores):
    allv = np.concatenate([np.concatenate([sg, sl]) for ps in scores for sg, sl in ps])
    grid = np.unique(np.quantile(allv, np.linspace(0, 1, 801)))
    return min(grid, key=lambda t: objective(rates(scores, t)))

def oracle(ps):
    """per-dataset oracle on eval packs: (loc at para>=.90, para at loc<=.05, best para-loc)"""
    sg = np.concatenate([a for a, b in ps]); sl = np.concatenate([b for a, b in ps])
    t90 = np.quantile(sg, 1 - PARA_MIN); t05 = np.quantile(sl, 1 - LOC_MAX)
    grid = np.unique(np.concatenate([sg, sl]))
    j = max((sg >= t).mean() - (sl >= t).mean() for t in grid[::max(1, len(grid) // 2000)])
    return (sl >= t90).mean(), (sg > t05).mean(), j

def main():
    t0 = time.time()
    data = {ds: load(ds) for ds in DSETS}
    feats = {(ds, split): [pack_features(*data[ds], off, N) for off in offs]
             for ds in DSETS for split, offs in (('train', TRAIN_OFF), ('eval', EVAL_OFF))}
    rules = [  # name, fn, param grid
        ('R0  raw cosine, one global t (fitted)', rule_raw, [None]),
        ('R0a raw cosine t=0.725 (zsRE best)', rule_raw, [None]),
        ('R0b raw cosine t=0.66 (CF best)', rule_raw, [None]),
        ('R0c raw cosine, t by prompt style (?)', rule_style, list(np.arange(0, 0.105, 0.005))),
        ('R1a c - Q_a(pack probe-vs-p sims)', rule_probe_q, [0.5, 0.75, 0.9, 0.95, 0.99, 1.0]),
        ('R1b per-fact z vs probes', rule_z, [None]),
        ('R1c NN margin c - max probe', rule_nn_probe, [None]),
        ('R2a max over p+variants', rule_variants_max, [None]),
        ('R2b c - [lam*Q.1(var) + (1-lam)*Q.95(probe)]', rule_var_probe, list(np.arange(0, 1.01, 0.1))),
        ('R3a c - Q_a(pack other-fact sims)', rule_others_q, [0.5, 0.75, 0.9, 0.95, 0.99]),
        ('R3b NN margin c - max(probe, other facts)', rule_nn_all, [None]),
        ('R5  CSLS c - (r_p + r_q)/2', rule_csls, [None]),
        ('R5b CSLS + style shift', rule_csls_style, list(np.arange(0, 0.105, 0.005))),
    ]
    rows = []
    def sc(fn, prm, split):
        return [[fn(F, prm) for F in feats[(ds, split)]] for ds in DSETS]
    for name, fn, grid in rules:
        best = None
        for prm in grid:
            tr = sc(fn, prm, 'train')
            t = 0.725 if 'R0a' in name else 0.66 if 'R0b' in name else fit_t(tr)
            o = objective(rates(tr, t))
            if best is None or o < best[0]: best = (o, prm, t)
        _, prm, t = best
        ev = sc(fn, prm, 'eval')
        rows.append((name, prm, t, rates(ev, t), [oracle(ps) for ps in ev]))
    # R4: logistic head fitted on train packs of both datasets (real para=1 / loc=0), frozen
    def xy(split, dss):
        X, y = [], []
        for ds in dss:
            for F in feats[(ds, split)]:
                X += [lr_feats(F, 'g'), lr_feats(F, 'l')]; y += [np.ones(N), np.zeros(N)]
        return np.concatenate(X), np.concatenate(y)
    def lr_scores(m, split): return [[(m(lr_feats(F, 'g')), m(lr_feats(F, 'l'))) for F in feats[(ds, split)]] for ds in DSETS]
    for tag, dss in (('both', DSETS), ('zsRE only', ['zsre']), ('CF only', ['counterfact'])):
        m = LR().fit(*xy('train', dss))
        tr = lr_scores(m, 'train'); tr_fit = [tr[DSETS.index(x)] for x in dss]
        t = fit_t(tr_fit); ev = lr_scores(m, 'eval')
        rows.append((f'R4  logistic head (fit: {tag})', None, t, rates(ev, t), [oracle(ps) for ps in ev]))
        if tag == 'both':
            json.dump({'features': LR_NAMES, 'mean': m.m.tolist(), 'std': m.s.tolist(), 'w': m.w[:-1].tolist(),
                       'b': float(m.w[-1]), 'logit_threshold': float(t), 'tau_same': TAU_SAME},
                      open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lr_head.json'), 'w'), indent=1)
    # ---- print table ----
    print(f'\nEval packs N={N}, offsets {EVAL_OFF}; constants fitted on offsets {TRAIN_OFF}; TAU_SAME={TAU_SAME}')
    print(f'{"rule":48s} {"param":>6s} {"t":>7s} | {"zsRE para":>9s} {"loc":>6s} | {"CF para":>8s} {"loc":>6s} | oracle zsRE / CF: loc@para.90, para@loc.05')
    for name, prm, t, r, orc in rows:
        ok = all(a >= PARA_MIN and b <= LOC_MAX for a, b in r)
        ps = '' if prm is None else f'{prm:.3g}'
        print(f'{name:48s} {ps:>6s} {t:7.3f} | {r[0][0]:9.3f} {r[0][1]:6.3f} | {r[1][0]:8.3f} {r[1][1]:6.3f} | '
              f'{orc[0][0]:.3f},{orc[0][1]:.3f} / {orc[1][0]:.3f},{orc[1][1]:.3f} {"OK" if ok else ""}')
    # ---- pack-size sensitivity for pack-dependent rules ----
    print('\nPack-size sensitivity (same frozen constants; N=10: 10 packs inside each eval block; N=1000: blocks 0..7000)')
    for name, prm, t, _, _ in rows:
        fn = dict((r[0], r[1]) for r in rules).get(name)
        if fn is None or name.startswith('R0a') or name.startswith('R0b'): continue
        out = []
        for n, offs in ((10, [k * 1000 + 10 * j for k in range(8) for j in range(10)]), (1000, EVAL_OFF)):
            ev = [[fn(pack_features(*data[ds], off, n), prm) for off in offs] for ds in DSETS]
            r = rates(ev, t); out.append(f'N={n}: zsRE {r[0][0]:.3f}/{r[0][1]:.3f} CF {r[1][0]:.3f}/{r[1][1]:.3f}')
        print(f'{name:48s} ' + ' | '.join(out))
    print(f'\nencoder: {enc.bench_ms([mask(x["prompt"], x["subject"]) for x in data["zsre"][0][:256]]):.2f} ms/prompt '
          f'(batch 64, 1 thread, masked zsRE prompts); total runtime {time.time() - t0:.0f}s')

if __name__ == '__main__':
    main()
