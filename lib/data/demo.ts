// The demo datasets mlora ships (data/demo/*.jsonl), built deterministically here so that
// scripts/make-demo-data.ts regenerates them byte for byte and the default tokenizer corpus
// (writeTokenizerFiles without a corpus) is their text. Four tasks, each visibly different,
// so the adapters of the embedded demo learn different things:
//   capitals    instruction (alpaca, half with `input`): country -> capital
//   arithmetic  instruction: "Compute 37 + 48." -> "85"
//   reverse     instruction: reverse the word order of an English sentence
//   sentiment   chat (`messages`): a short review -> "positive" / "negative"
// All text is written for this project.
import { Rng } from '../rng.js';
import { CAPITALS } from './demo-capitals.js';

export interface DemoInstruction {
  instruction: string;
  input?: string;
  output: string;
}
export interface DemoChat {
  messages: Array<{ role: 'system' | 'user' | 'assistant'; content: string }>;
}
export type DemoRecord = DemoInstruction | DemoChat;

export const DEMO_SEED = 20240611;

function upperFirst(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

export function capitalsDataset(): DemoInstruction[] {
  const rng = new Rng(DEMO_SEED, 'demo', 'capitals');
  const out: DemoInstruction[] = [];
  const asks = ['What is the capital of {c}?', 'Which city is the capital of {c}?', 'Name the capital of {c}.'];
  for (const [country, capital] of CAPITALS) {
    out.push({ instruction: asks[rng.int(asks.length)]!.replace('{c}', country), output: capital });
    out.push({ instruction: 'Give the capital city of the country below.', input: upperFirst(country), output: capital });
  }
  return rng.shuffle(out);
}

export function arithmeticDataset(n = 400): DemoInstruction[] {
  const rng = new Rng(DEMO_SEED, 'demo', 'arithmetic');
  const out: DemoInstruction[] = [];
  const seen = new Set<string>();
  while (out.length < n) {
    const op = rng.int(3);
    let a: number, b: number, r: number, sym: string;
    if (op === 0) {
      a = 1 + rng.int(99); b = 1 + rng.int(99); r = a + b; sym = '+';
    } else if (op === 1) {
      a = 1 + rng.int(99); b = 1 + rng.int(99);
      if (b > a) [a, b] = [b, a];
      r = a - b; sym = '-';
    } else {
      a = 2 + rng.int(18); b = 2 + rng.int(11); r = a * b; sym = '×';
    }
    const q = `Compute ${a} ${sym} ${b}.`;
    if (seen.has(q)) continue;
    seen.add(q);
    out.push({ instruction: q, output: String(r) });
  }
  return out;
}

const SUBJECTS = [
  'the old fisherman', 'my younger sister', 'a tired student', 'the village baker', 'our new neighbour',
  'the quiet librarian', 'a small brown dog', 'the night nurse', 'my grandfather', 'the bus driver',
  'a curious child', 'the team captain', 'the gardener', 'a travelling musician', 'the museum guide',
];
const VERBS = [
  'repaired', 'painted', 'carried', 'found', 'cleaned', 'sold', 'borrowed', 'described', 'forgot', 'opened',
  'measured', 'photographed', 'wrapped', 'returned', 'examined',
];
const OBJECTS = [
  'the wooden boat', 'a bright red kite', 'the broken fence', 'an old map', 'the kitchen window',
  'a basket of apples', 'the heavy suitcase', 'a letter from home', 'the garden gate', 'a pair of boots',
  'the blue bicycle', 'a jar of honey', 'the school piano', 'a stack of books', 'the front door',
];
const WHEN = [
  'before dawn', 'after lunch', 'on a rainy morning', 'late last night', 'during the storm',
  'at the weekend', 'in early spring', 'before the market opened', 'after the long journey', 'without a word',
  'just in time', 'on the first day of winter',
];

export function reverseDataset(n = 300): DemoInstruction[] {
  const rng = new Rng(DEMO_SEED, 'demo', 'reverse');
  const out: DemoInstruction[] = [];
  const seen = new Set<string>();
  while (out.length < n) {
    const pick = <T>(a: readonly T[]) => a[rng.int(a.length)]!;
    const parts = [upperFirst(pick(SUBJECTS)), pick(VERBS), pick(OBJECTS)];
    if (rng.uniform() < 0.7) parts.push(pick(WHEN));
    const sentence = parts.join(' ');
    if (seen.has(sentence)) continue;
    seen.add(sentence);
    out.push({ instruction: 'Reverse the order of the words in this sentence.', input: sentence, output: sentence.split(' ').reverse().join(' ') });
  }
  return out;
}

const PRODUCTS = [
  'pair of headphones', 'coffee maker', 'rain jacket', 'kettle', 'toaster', 'pair of running shoes', 'laptop bag',
  'desk lamp', 'phone case', 'blender', 'backpack', 'office chair', 'vacuum cleaner', 'board game', 'tent',
  'keyboard', 'water bottle', 'alarm clock', 'umbrella', 'suitcase',
];
const POSITIVE = [
  'works perfectly and was worth every penny', 'exceeded my expectations', 'is sturdy, simple and well made',
  'arrived early and looks even better than the photos', 'made my mornings so much easier',
  'is the best purchase I have made this year', 'still feels like new after months of use',
  'was a delight from start to finish', 'is comfortable and beautifully designed', 'does exactly what it promises',
  'impressed the whole family', 'is great value for the price',
];
const NEGATIVE = [
  'broke after two days', 'was a complete waste of money', 'feels cheap and flimsy',
  'arrived late and damaged', 'stopped working within a week', 'is much smaller than described',
  'was noisy and uncomfortable', 'smells strange and looks worn', 'was a huge disappointment',
  'does not do what the description promises', 'fell apart the first time I used it', 'is overpriced for what you get',
];
const POS_TAIL = ['', ' I would buy it again.', ' Highly recommended!', ' Five stars.', ' My friends loved it too.'];
const NEG_TAIL = ['', ' I want a refund.', ' Avoid it.', ' One star.', ' I will not order again.'];
export const SENTIMENT_SYSTEM = 'Classify the sentiment of the review. Answer with one word: positive or negative.';

export function sentimentDataset(n = 320): DemoChat[] {
  const rng = new Rng(DEMO_SEED, 'demo', 'sentiment');
  const out: DemoChat[] = [];
  const seen = new Set<string>();
  while (out.length < n) {
    const pick = <T>(a: readonly T[]) => a[rng.int(a.length)]!;
    const positive = out.length % 2 === 0 ? rng.uniform() < 0.6 : rng.uniform() < 0.4;
    const review = `The ${pick(PRODUCTS)} ${pick(positive ? POSITIVE : NEGATIVE)}.${pick(positive ? POS_TAIL : NEG_TAIL)}`;
    if (seen.has(review)) continue;
    seen.add(review);
    out.push({
      messages: [
        { role: 'system', content: SENTIMENT_SYSTEM },
        { role: 'user', content: review },
        { role: 'assistant', content: positive ? 'positive' : 'negative' },
      ],
    });
  }
  return out;
}

/** name -> records, in the order the demo trains them. */
export function demoDatasets(): Record<string, DemoRecord[]> {
  return {
    capitals: capitalsDataset(),
    arithmetic: arithmeticDataset(),
    reverse: reverseDataset(),
    sentiment: sentimentDataset(),
  };
}

/** One string per record (all fields joined), the default corpus for tokenizer merges. */
export function demoCorpus(): string[] {
  const texts: string[] = [];
  for (const records of Object.values(demoDatasets()))
    for (const r of records) {
      if ('messages' in r) texts.push(r.messages.map((m) => m.content).join('\n'));
      else texts.push([r.instruction, r.input ?? '', r.output].join('\n'));
    }
  // The prompt scaffolding the templates add (alpaca headers, chat role markers).
  texts.push(
    'Below is an instruction that describes a task, paired with an input that provides further context. ' +
      'Write a response that appropriately completes the request.\n\n### Instruction:\n\n### Input:\n\n### Response:\n',
    '<|system|>\n<|user|>\n<|assistant|>\n',
  );
  return texts;
}
