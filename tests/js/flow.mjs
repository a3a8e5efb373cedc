// The real Braintrust TypeScript SDK's everyday flow, run by tests/integration/test_js_sdk.py.
//
// Needs BRAINTRUST_APP_URL (the gateway) and BRAINTRUST_API_KEY. Prints one JSON line with what the SDK saw
// and exits 0; any failure exits 1 with the error on stderr.
import * as braintrust from "braintrust";

const PROJECT = "proj-js";

async function main() {
  const state = await braintrust.login({ forceLogin: true });
  const login = { apiUrl: state.apiUrl, proxyUrl: state.proxyUrl, orgName: state.orgName };

  // An experiment: three scored rows and a traced span, then the summary (scores from the data plane).
  const experiment = braintrust.init(PROJECT, { experiment: "exp-js" });
  for (let i = 0; i < 3; i++) {
    experiment.log({ input: i, output: i * 2, scores: { accuracy: i === 2 ? 0.5 : 1 } });
  }
  await experiment.traced(
    async (span) => {
      span.log({ input: "q", output: "a", metadata: { via: "traced" } });
    },
    { name: "step" },
  );
  const summary = await experiment.summarize();

  // A dataset: inserts, then the rows fetched back (BTQL object fetcher).
  const dataset = braintrust.initDataset(PROJECT, { dataset: "ds-js" });
  dataset.insert({ input: "a", expected: "b" });
  dataset.insert({ input: "c", expected: "d", metadata: { n: 2 } });
  await dataset.flush();
  const fetched = [];
  for await (const row of dataset.fetch()) {
    fetched.push([row.input, row.expected]);
  }
  fetched.sort();
  const datasetSummary = await dataset.summarize();

  // A project logger: one row, flushed.
  const logger = braintrust.initLogger({ projectName: PROJECT, asyncFlush: true });
  const loggedId = logger.log({ input: "hello", output: "world", scores: { polite: 1 } });
  await logger.flush();

  // A small Eval: a task and a scorer over three data points; a quiet reporter keeps stdout to one line.
  const quiet = { name: "quiet", reportEval: () => true, reportRun: () => true };
  const evalResult = await braintrust.Eval(
    PROJECT,
    {
      experimentName: "eval-js",
      data: () => [
        { input: 1, expected: 2 },
        { input: 2, expected: 4 },
        { input: 3, expected: 7 },
      ],
      task: async (input) => input * 2,
      scores: [({ output, expected }) => ({ name: "accuracy", score: output === expected ? 1 : 0 })],
    },
    { reporter: quiet, progress: { start() {}, stop() {}, increment() {}, setTotal() {} } },
  );
  await braintrust.flush();
  // The first experiment again, compared with the Eval's (looked up by id on the data plane).
  const compared = await experiment.summarize({ comparisonExperimentId: evalResult.summary.experimentId });

  const scoresOf = (scores) =>
    Object.fromEntries(Object.entries(scores ?? {}).map(([name, s]) => [name, s.score]));
  const out = {
    login,
    experiment: {
      id: await experiment.id,
      name: summary.experimentName,
      url: summary.experimentUrl,
      scores: scoresOf(summary.scores),
    },
    dataset: {
      id: await dataset.id,
      rows: fetched,
      totalRecords: datasetSummary.dataSummary?.totalRecords ?? null,
    },
    comparison: {
      name: compared.comparisonExperimentName ?? null,
      diffs: Object.fromEntries(Object.entries(compared.scores).map(([name, s]) => [name, s.diff ?? null])),
    },
    logger: { projectId: (await logger.project).id, rowId: loggedId },
    eval: {
      experimentId: evalResult.summary.experimentId,
      experimentName: evalResult.summary.experimentName,
      scores: scoresOf(evalResult.summary.scores),
      outputs: evalResult.results.map((r) => r.output),
      errors: evalResult.results.filter((r) => r.error !== undefined).length,
    },
  };
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`flow failed: ${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
