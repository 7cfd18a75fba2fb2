// Progress display for `mlora train`: one bar per adapter (step/total, loss, lr, tokens/s,
// ETA) and a line for stage utilisation, redrawn in place on a TTY; plain log lines otherwise.
import type { JobEvent } from '../../actors/protocol.js';

interface Row {
  name: string;
  step: number;
  total: number;
  loss: number;
  lr: number;
  tokens: number;
  start: number;
  state: string;
  evalLoss?: number;
}

export class Progress {
  private rows = new Map<string, Row>();
  private lines = 0;
  private timer: NodeJS.Timeout | undefined;
  private footer = '';
  constructor(
    private readonly mode: 'bar' | 'plain' | 'none',
    private readonly out: NodeJS.WriteStream = process.stdout,
    private readonly every = 1,
  ) {
    if (mode === 'bar') {
      this.timer = setInterval(() => this.draw(), 250);
      this.timer.unref();
    }
  }

  static pick(
    setting: 'auto' | 'bar' | 'plain' | 'none',
    out: NodeJS.WriteStream = process.stdout,
  ): 'bar' | 'plain' | 'none' {
    if (setting !== 'auto') return setting;
    return out.isTTY && process.env.TERM !== 'dumb' && !process.env.CI ? 'bar' : 'plain';
  }

  setFooter(s: string) {
    this.footer = s;
  }

  log(line: string) {
    if (this.mode === 'none') return;
    if (this.mode === 'bar') this.clear();
    this.out.write(line + '\n');
    if (this.mode === 'bar') this.draw();
  }

  event(ev: JobEvent) {
    const r = this.rows.get(ev.adapter ?? '') ?? {
      name: ev.adapter ?? '',
      step: 0,
      total: 0,
      loss: NaN,
      lr: 0,
      tokens: 0,
      start: Date.now(),
      state: 'queued',
    };
    if (ev.adapter) this.rows.set(ev.adapter, r);
    switch (ev.type) {
      case 'state':
        r.state = ev.state;
        if (ev.state === 'running') r.start = Date.now();
        if (this.mode === 'plain' && ev.state !== 'running' && ev.state !== 'queued' && ev.state !== 'loading')
          this.log(`[${ev.adapter}] ${ev.state}`);
        break;
      case 'step':
        Object.assign(r, { step: ev.step, total: ev.totalSteps, loss: ev.loss, lr: ev.lr, tokens: ev.tokens });
        if (this.mode === 'plain' && (ev.step % this.every === 0 || ev.step === ev.totalSteps)) {
          this.log(
            `[${ev.adapter}] step ${ev.step}/${ev.totalSteps} loss ${ev.loss.toFixed(4)} lr ${ev.lr.toExponential(2)} grad-norm ${ev.gradNorm.toFixed(3)} ${this.rate(r)}`,
          );
        }
        break;
      case 'eval':
        r.evalLoss = ev.loss;
        this.log(
          `[${ev.adapter}] eval at step ${ev.step}: loss ${ev.loss.toFixed(4)} perplexity ${ev.perplexity.toFixed(2)} (${ev.tokens} tokens)`,
        );
        break;
      case 'sample':
        if (this.mode === 'plain')
          this.log(
            `[${ev.adapter}] sample ${ev.when} (step ${ev.step}): ${JSON.stringify(ev.prompt)} -> ${JSON.stringify(ev.text)}`,
          );
        break;
      case 'checkpoint':
        if (this.mode === 'plain') this.log(`[${ev.adapter}] checkpoint ${ev.path}`);
        break;
      case 'fault':
        this.log(`fault${ev.adapter ? ` [${ev.adapter}]` : ''}: ${ev.fault}: ${ev.detail}`);
        break;
      case 'rollback':
        r.step = ev.toStep;
        this.log(
          `[${ev.adapter}] ${ev.reason}: rolled back to step ${ev.toStep}, learning rate now ${ev.lrScale} × the configured one (rollback ${ev.rollbacks})`,
        );
        break;
      case 'error':
        this.log(`[${ev.adapter}] error: ${ev.message}`);
        break;
      case 'done':
        if (this.mode === 'plain')
          this.log(
            `[${ev.adapter}] done: ${ev.steps} steps, final loss ${ev.loss.toFixed(4)}${ev.path ? `, saved to ${ev.path}` : ''}`,
          );
        break;
    }
  }

  private rate(r: Row): string {
    const s = (Date.now() - r.start) / 1000;
    return s > 0 ? `${Math.round(r.tokens / s)} tok/s` : '';
  }

  private clear() {
    if (this.lines) this.out.write(`\x1b[${this.lines}A\x1b[0J`);
    this.lines = 0;
  }

  private draw() {
    if (this.mode !== 'bar') return;
    this.clear();
    const w = 24;
    const lines: string[] = [];
    for (const r of this.rows.values()) {
      const frac = r.total ? r.step / r.total : 0;
      const bar = '█'.repeat(Math.round(frac * w)).padEnd(w, '░');
      const el = (Date.now() - r.start) / 1000;
      const eta = frac > 0 && frac < 1 ? `ETA ${Math.round((el / frac) * (1 - frac))}s` : '';
      lines.push(
        `${r.name.padEnd(14).slice(0, 14)} ${bar} ${String(r.step).padStart(4)}/${r.total} ` +
          `loss ${Number.isFinite(r.loss) ? r.loss.toFixed(4) : '  -   '} lr ${r.lr.toExponential(1)} ${this.rate(r).padEnd(11)} ${r.state === 'running' ? eta : r.state}`,
      );
    }
    if (this.footer) lines.push(this.footer);
    this.out.write(lines.join('\n') + '\n');
    this.lines = lines.length;
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    if (this.mode === 'bar') this.draw();
  }
}
