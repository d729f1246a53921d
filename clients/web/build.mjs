// Builds the Bento page into bento/web/static/ (or the directory given as the
// first argument): app.js and app.css bundled by esbuild from src/ and the
// npm packages in package-lock.json, index.html copied, and BUILD: the sha256
// of every source and every output, which tests/web/test_build.py checks
// without Node. The output depends only on the sources and the lock: no time,
// no absolute path, no random name goes into it.

import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const outDir = resolve(process.argv[2] || join(repo, 'bento', 'web', 'static'));

/** The files the build reads, as paths relative to the repository. */
function sources() {
  const src = readdirSync(join(here, 'src')).sort().map((name) => join(here, 'src', name));
  return [join(here, 'build.mjs'), join(here, 'package.json'), join(here, 'package-lock.json'), ...src]
    .map((path) => relative(repo, path).split('\\').join('/'));
}

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

const result = await esbuild.build({
  absWorkingDir: here,
  entryPoints: { app: 'src/main.js' },
  bundle: true,
  minify: true,
  format: 'iife',
  target: 'es2022',
  legalComments: 'eof',
  charset: 'utf8',
  outdir: 'out',
  write: false,
  logLevel: 'warning',
});

const outputs = new Map();
for (const file of result.outputFiles) outputs.set(relative(join(here, 'out'), file.path), file.contents);
outputs.set('index.html', readFileSync(join(here, 'src', 'index.html')));

const stamp = [
  '# The Bento page, built by clients/web/build.mjs (`make web`): do not edit these files by hand.',
  '# tests/web/test_build.py checks that every hash below matches.',
  ...sources().map((path) => `source ${sha256(readFileSync(join(repo, path)))} ${path}`),
  ...[...outputs.keys()].sort().map((name) => `output ${sha256(outputs.get(name))} ${name}`),
  '',
].join('\n');

mkdirSync(outDir, { recursive: true });
for (const [name, contents] of outputs) writeFileSync(join(outDir, name), contents);
writeFileSync(join(outDir, 'BUILD'), stamp);
console.log(`built ${[...outputs.keys()].sort().join(', ')} and BUILD into ${outDir}`);
