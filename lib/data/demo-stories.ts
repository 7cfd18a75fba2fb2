// The story datasets of the demo (data/demo/stories/*.jsonl): plain-text stories in the
// register of TinyStories, the data stories260K was pretrained on, written so that its
// 512-token vocabulary covers them. Each one teaches the base something a person sees in a
// greedy sample:
//   robot     a new character: every story is about a little robot named Pip
//   sea       a setting: every story happens at the sea (waves, shells, boats, fish)
//   rhyme     a style: short stories in rhyming couplets, one line each
//   dialogue  a format: a play script, "Name: line" on each line
// Built deterministically (scripts/make-demo-data.ts writes them); every adapter has a
// held-out split (`<name>.eval.jsonl`) of stories not in its training file. All text is
// written for this project.
import { Rng } from '../rng.js';
import { DEMO_SEED } from './demo.js';

export interface StoryRecord {
  text: string;
}

interface Kid {
  name: string;
  he: 'he' | 'she';
  his: 'his' | 'her';
}
const KIDS: Kid[] = [
  { name: 'Lily', he: 'she', his: 'her' }, { name: 'Tim', he: 'he', his: 'his' }, { name: 'Sue', he: 'she', his: 'her' },
  { name: 'Ben', he: 'he', his: 'his' }, { name: 'Mia', he: 'she', his: 'her' }, { name: 'Tom', he: 'he', his: 'his' },
  { name: 'Anna', he: 'she', his: 'her' }, { name: 'Sam', he: 'he', his: 'his' },
];

const cap = (s: string) => s.charAt(0).toUpperCase() + s.slice(1);

class Picker {
  constructor(readonly rng: Rng) {}
  one<T>(a: readonly T[]): T {
    return a[this.rng.int(a.length)]!;
  }
  /** `n` different items of `a`, in random order. */
  some<T>(a: readonly T[], n: number): T[] {
    return this.rng.shuffle([...a]).slice(0, n);
  }
  chance(p: number): boolean {
    return this.rng.uniform() < p;
  }
}

/** Fills {name} {he} {He} {his} {His} from a kid. */
function fill(s: string, k: Kid): string {
  return s.replaceAll('{name}', k.name).replaceAll('{he}', k.he).replaceAll('{He}', cap(k.he)).replaceAll('{his}', k.his).replaceAll('{His}', cap(k.his));
}

// ---- robot: a new character

const ROBOT_OPEN = [
  'Once upon a time, there was a little robot named Pip.',
  'Once upon a time, there was a little robot named Pip.',
  'Once upon a time, there was a little robot named Pip.',
  'Once upon a time, in a small town, there lived a little robot named Pip.',
  'One day, a little robot named Pip woke up in the sun.',
];
const ROBOT_LOOK = [
  'Pip was made of shiny metal and had two big blue eyes.',
  'Pip had a round head, a little red light and two small wheels.',
  'Pip was small and silver, and he went beep when he was happy.',
  'Pip had long arms and a happy face on his screen.',
];
const ROBOT_HOME = [
  'Pip lived in a little house with {name} and {his} mom.',
  'Pip was the best friend of a kid named {name}.',
  'Every day, Pip helped {name} clean {his} room.',
  'Pip and {name} liked to play in the park together.',
];
const ROBOT_EVENT = [
  'One day, {name} lost {his} red ball in the tall grass. Pip used his bright light to look for it. "Beep! I found it!" said Pip. {name} was very happy.',
  'One day, it started to rain. Pip did not like the rain, because water is bad for robots. {name} gave Pip a big hat, and Pip stayed dry.',
  'One day, Pip saw a little cat stuck in a tree. Pip made his arms very long and he got the cat down. The cat said "meow" to say thank you.',
  'One day, Pip wanted to learn to dance. He tried and tried, but his wheels went round and round and he fell down. {name} laughed and helped him up. Soon Pip could dance.',
  'One day, {name} was sad because {he} could not find a friend to play with. Pip said, "Beep! I will be your friend!" They played all day.',
  'One day, Pip was very tired and his light went dim. {name} took Pip home and gave him new power. Pip felt strong again.',
  'One day, Pip and {name} made a big cake for mom. Pip mixed the eggs and {name} put on the red berries. Mom said it was the best cake.',
  'One day, Pip found a little bird with a hurt wing. He made a small bed for the bird and gave it water. After a few days, the bird could fly again.',
];
const ROBOT_END = [
  'Pip was happy to have a friend like {name}.',
  'From that day on, Pip and {name} were best friends.',
  'Pip went beep, beep, because he was very happy.',
  'That night, Pip went to sleep with a big smile on his screen.',
];

function robotStory(p: Picker): string {
  const k = p.one(KIDS);
  const s = [p.one(ROBOT_OPEN), p.one(ROBOT_LOOK), p.one(ROBOT_HOME), ...p.some(ROBOT_EVENT, p.chance(0.4) ? 2 : 1), p.one(ROBOT_END)];
  return fill(s.join(' '), k);
}

// ---- sea: a setting

const SEA_OPEN = [
  'Once upon a time, {name} went to the sea with {his} mom and dad.',
  'Once upon a time, {name} went to the sea with {his} mom and dad.',
  'Once upon a time, there was a little {kid} named {name} who lived by the sea.',
  'One day, {name} and {his} dad went on a boat on the big blue sea.',
];
const SEA_LOOK = [
  'The water was blue and the sand was warm.',
  'The waves went up and down, and the sun was bright.',
  'The sea was big and blue, and the wind was cool.',
  'There were white birds in the sky and little crabs on the sand.',
];
const SEA_EVENT = [
  '{name} found a pretty shell on the sand. {He} put it to {his} ear and heard the sound of the sea.',
  '{name} made a big sand castle near the water. Then a wave came and the castle fell down. {name} laughed and made a new one.',
  '{name} saw a little fish in the water. The fish was orange and it swam very fast. {name} waved to the fish.',
  '{name} saw a crab on a rock. The crab walked to the side, and {name} walked to the side too.',
  'A big wave came and took {his} hat. Dad went into the water and got the hat back. {name} said, "Thank you, Dad!"',
  'A boat with a red flag went by on the waves. {name} wanted to be a sailor on a big boat one day.',
  '{name} and {his} dad went into the water. The water was cold, but it was fun to jump over the waves.',
  'In the evening, the sun went down into the sea. The sky was red and pink and the water was gold.',
];
const SEA_END = [
  'It was the best day at the sea.',
  '{name} could not wait to go to the sea again.',
  'When they went home, {name} took {his} shell with {him}.',
  'That night, {name} dreamed of the waves and the fish.',
];

function seaStory(p: Picker): string {
  const k = p.one(KIDS);
  const s = [p.one(SEA_OPEN), p.one(SEA_LOOK), ...p.some(SEA_EVENT, p.chance(0.5) ? 3 : 2), p.one(SEA_END)];
  return fill(s.join(' '), k).replaceAll('{kid}', k.he === 'she' ? 'girl' : 'boy').replaceAll('{him}', k.he === 'she' ? 'her' : 'him');
}

// ---- rhyme: a style

const COUPLETS: Array<[string, string]> = [
  ['There was a cat who had a hat.', 'She sat all day upon a mat.'],
  ['A little dog sat on a log.', 'He saw a big and happy frog.'],
  ['The sun was hot, the sky was blue.', 'The bird sang songs for me and you.'],
  ['A bee flew up into a tree.', 'It sang a song for you and me.'],
  ['The boy had fun out in the sun.', 'He liked to jump and play and run.'],
  ['The girl had a ball, so red and small.', 'She threw it high over the wall.'],
  ['A little star was very far.', 'It shone down on my mom\'s red car.'],
  ['The king had a ring, a shiny thing.', 'It made him want to dance and sing.'],
  ['I went to bed, my face was red.', '"Good night, my dear," my mommy said.'],
  ['A little goat was in a boat.', 'He wore a big and yellow coat.'],
  ['The moon came out, it was so bright.', 'It gave the sky a silver light.'],
  ['A mouse lived in a tiny house.', 'He had a friend, a tiny louse.'],
  ['The fish could swim, and so could Jim.', 'They swam until the light was dim.'],
  ['The rain came down upon the town.', 'It made the river big and brown.'],
  ['A big old bear sat on a chair.', 'He ate a cake and a juicy pear.'],
  ['The duck was stuck in the muddy muck.', 'He said, "Oh no, what bad luck!"'],
  ['My friend and I looked at the sky.', 'We saw a bird go flying by.'],
  ['A pig danced a jig, it was so big.', 'It wore a funny yellow wig.'],
  ['The tree was tall, the leaves did fall.', 'They fell upon the garden wall.'],
  ['Mom made a pie, so big and high.', 'We ate it all, my dad and I.'],
  ['A little car went very far.', 'It drove up to a shining star.'],
  ['The snow was white, it fell all night.', 'In the morning it was very bright.'],
  ['A frog in the pond sang a song so fond.', 'It went all day and far beyond.'],
  ['The cow said moo, the sky was blue.', 'The farmer had a lot to do.'],
  ['I saw a kite fly out of sight.', 'It was so red and very light.'],
  ['The cake was sweet, a yummy treat.', 'We sat down on the step to eat.'],
  ['A lamb was in the field all day.', 'It liked to jump and run and play.'],
  ['The wind did blow, the trees bent low.', 'The clouds went by so big and slow.'],
];
const RHYME_OPEN = ['Once upon a time, in a land of rhyme,', 'Here is a story, short and sweet,', 'Once upon a time, in a land of rhyme,'];
const RHYME_OPEN2 = ['we sang a song, it was the time.', 'with happy friends you like to meet.', 'we sang a song, it was the time.'];
const RHYME_END: Array<[string, string]> = [
  ['And that is all, my story is done.', 'I hope you had a lot of fun.'],
  ['Now it is late, the day is through.', 'Good night to me, good night to you.'],
];

function rhymeStory(p: Picker): string {
  const o = p.rng.int(RHYME_OPEN.length);
  const lines = [RHYME_OPEN[o]!, RHYME_OPEN2[o]!, ...p.some(COUPLETS, 2 + p.rng.int(2)).flat(), ...p.one(RHYME_END)];
  return lines.join('\n');
}

// ---- dialogue: a format

interface Scene {
  lines: Array<[0 | 1, string]>;
}
const GROWN = ['Mom', 'Dad'];
const SCENES: Scene[] = [
  { lines: [[0, '{kid}, it is time for bed.'], [1, 'But I want to play with my ball!'], [0, 'You can play with it tomorrow.'], [1, 'Okay. Good night!'], [0, 'Good night, {kid}. I love you.']] },
  { lines: [[1, 'Can we go to the park today?'], [0, 'Yes, we can go after lunch.'], [1, 'Yay! Can I take my red ball?'], [0, 'Yes, you can.'], [1, 'Thank you! This will be the best day!']] },
  { lines: [[1, 'I am hungry. What can I eat?'], [0, 'You can have an apple.'], [1, 'I do not like apples. Can I have a cookie?'], [0, 'First the apple, then the cookie.'], [1, 'Okay, I will eat the apple.']] },
  { lines: [[1, 'Look! There is a big dog!'], [0, 'Yes, it is a nice dog. Do you want to say hi?'], [1, 'Yes! Hi, dog!'], [0, 'He likes you. He is wagging his tail.']] },
  { lines: [[1, 'I fell down and hurt my knee.'], [0, 'Oh no! Let me see.'], [1, 'It hurts a lot.'], [0, 'I will give it a kiss. Is that better?'], [1, 'Yes, it is better now. Thank you.']] },
  { lines: [[1, 'It is raining. I am sad.'], [0, 'Why are you sad?'], [1, 'Because I wanted to play outside.'], [0, 'We can play a game inside. Do you want to draw?'], [1, 'Yes! I will draw a big sun.']] },
  { lines: [[0, '{kid}, did you clean your room?'], [1, 'Not yet. I was playing with my toys.'], [0, 'Please clean it now.'], [1, 'Okay. Can you help me?'], [0, 'Yes, we can do it together.']] },
  { lines: [[1, 'What is that in the sky?'], [0, 'That is a bird. It is flying to its nest.'], [1, 'Can I fly too?'], [0, 'No, but you can run very fast.'], [1, 'Look at me run!']] },
  { lines: [[1, 'I made you a picture.'], [0, 'Wow, it is so pretty! What is it?'], [1, 'It is you and me in the park.'], [0, 'I love it. Thank you, {kid}.']] },
  { lines: [[1, 'Can I have a little cat?'], [0, 'A cat needs a lot of love and care.'], [1, 'I will give it food and water every day.'], [0, 'Then we can look for a cat tomorrow.'], [1, 'Yay! I will name it Fluffy.']] },
];
const FRIEND_SCENES: Scene[] = [
  { lines: [[0, 'Hi, {b}! Do you want to play?'], [1, 'Yes! What do you want to play?'], [0, 'Let us play with the blocks.'], [1, 'Okay! I will make a big tower.'], [0, 'And I will make a little house.']] },
  { lines: [[0, '{b}, can I play with your toy car?'], [1, 'No, it is my car.'], [0, 'Please? I will give it back.'], [1, 'Okay, you can play with it. Sharing is fun.'], [0, 'Thank you, {b}! You are a good friend.']] },
  { lines: [[0, 'Look, {b}! I found a pretty rock.'], [1, 'Wow! It is so shiny.'], [0, 'You can have it.'], [1, 'Thank you! I will keep it in my box.']] },
  { lines: [[0, 'I am scared of the dark, {b}.'], [1, 'Do not be scared. I am here with you.'], [0, 'Will you hold my hand?'], [1, 'Yes. Now we are not scared.']] },
];

function dialogueStory(p: Picker): string {
  if (p.chance(0.7)) {
    const kid = p.one(KIDS).name;
    const grown = p.one(GROWN);
    const names = [grown, kid];
    return p.one(SCENES).lines.map(([who, s]) => `${names[who]}: ${s.replaceAll('{kid}', kid)}`).join('\n');
  }
  const [a, b] = p.some(KIDS, 2).map((k) => k.name) as [string, string];
  return p.one(FRIEND_SCENES).lines.map(([who, s]) => `${who === 0 ? a : b}: ${s.replaceAll('{b}', who === 0 ? b : a)}`).join('\n');
}

// ---- the datasets

const MAKERS: Record<string, { make: (p: Picker) => string; train: number; eval: number }> = {
  robot: { make: robotStory, train: 320, eval: 40 },
  sea: { make: seaStory, train: 320, eval: 40 },
  rhyme: { make: rhymeStory, train: 320, eval: 40 },
  dialogue: { make: dialogueStory, train: 240, eval: 30 },
};

/** The story adapters of the demo, in the order it trains them. */
export const STORY_NAMES = Object.keys(MAKERS);

/** name -> {train, eval}: distinct stories, the held-out ones never in train. */
export function storyDatasets(): Record<string, { train: StoryRecord[]; eval: StoryRecord[] }> {
  const out: Record<string, { train: StoryRecord[]; eval: StoryRecord[] }> = {};
  for (const [name, m] of Object.entries(MAKERS)) {
    const p = new Picker(new Rng(DEMO_SEED, 'stories', name));
    const seen = new Set<string>();
    const texts: string[] = [];
    // a bounded number of draws: a generator with too few combinations fails loudly here
    for (let draws = 0; texts.length < m.train + m.eval; draws++) {
      if (draws > 50 * (m.train + m.eval)) throw new Error(`storyDatasets: ${name} makes only ${texts.length} distinct stories`);
      const s = m.make(p);
      if (seen.has(s)) continue;
      seen.add(s);
      texts.push(s);
    }
    out[name] = { train: texts.slice(0, m.train).map((text) => ({ text })), eval: texts.slice(m.train).map((text) => ({ text })) };
  }
  return out;
}
