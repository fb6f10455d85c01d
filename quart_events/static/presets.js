// Bindings for the Taskcluster queue's exchanges, built the way Taskcluster's
// client libraries build them (QueueEvents().taskCompleted({taskId}) and so on):
// the routing key's words in order, the given one filled in, every other single
// word `*`, the trailing reserved entry `#`.

export const QUEUE_PREFIX = "exchange/taskcluster-queue/v1/";

const TASK_KEY = [
  "routingKeyKind", "taskId", "runId", "workerGroup", "workerId",
  "provisionerId", "workerType", "schedulerId", "taskGroupId", "reserved",
];
const TASK_GROUP_KEY = ["routingKeyKind", "taskGroupId", "schedulerId", "reserved"];

export const QUEUE_EXCHANGES = [
  ["task-defined", TASK_KEY],
  ["task-pending", TASK_KEY],
  ["task-running", TASK_KEY],
  ["artifact-created", TASK_KEY],
  ["task-completed", TASK_KEY],
  ["task-failed", TASK_KEY],
  ["task-exception", TASK_KEY],
  ["task-group-resolved", TASK_GROUP_KEY],
].map(([name, key]) => ({ name, exchange: QUEUE_PREFIX + name, key }));

// A slugid: 22 characters of the URL-safe base64 alphabet.
const SLUGID = /^[A-Za-z0-9_-]{22}$/;

/** The binding of one queue exchange for one id; throws an Error saying what is wrong. */
export function presetBinding(name, kind, id) {
  const exchange = QUEUE_EXCHANGES.find((e) => e.name === name);
  if (!exchange) throw new Error(`unknown queue exchange ${name}`);
  if (!SLUGID.test(id)) {
    throw new Error(`a ${kind} is 22 characters of A-Z, a-z, 0-9, - and _`);
  }
  if (!exchange.key.includes(kind)) {
    throw new Error(`${name} messages are keyed by taskGroupId, not ${kind}`);
  }
  const words = exchange.key.map((entry) => {
    if (entry === "routingKeyKind") return "primary";
    if (entry === "reserved") return "#";
    return entry === kind ? id : "*";
  });
  return { exchange: exchange.exchange, routingKeyPattern: words.join(".") };
}

/** Every binding a preset choice adds: one exchange, or each that the id fits. */
export function presetBindings(name, kind, id) {
  if (name !== "*") return [presetBinding(name, kind, id)];
  return QUEUE_EXCHANGES.filter((e) => e.key.includes(kind)).map((e) =>
    presetBinding(e.name, kind, id),
  );
}
