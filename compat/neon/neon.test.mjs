// @neondatabase/serverless against sluice-pooler's front door, configured as its docs
// say for a self-hosted endpoint: fetchEndpoint for neon() over HTTP, wsProxy for
// Pool/Client over WebSocket. Run by pooler/tests/neon.rs, which starts PostgreSQL and the
// pooler and sets SLUICE_HTTP (host:port) and DATABASE_URL.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import ws from 'ws'
import { neon, neonConfig, Pool, Client } from '@neondatabase/serverless'

const front = process.env.SLUICE_HTTP
const url = process.env.DATABASE_URL
assert.ok(front && url, 'SLUICE_HTTP and DATABASE_URL are set by pooler/tests/neon.rs')

neonConfig.fetchEndpoint = () => `http://${front}/sql`
neonConfig.webSocketConstructor = ws
neonConfig.useSecureWebSocket = false
neonConfig.wsProxy = (host, port) => `${front}/v2?address=${host}:${port}`

const sql = neon(url)

test('neon(): a query with parameters, values parsed by their types', async () => {
  const rows = await sql`select ${41}::int + 1 as n, ${'a b'} as s, ${null}::text as nothing,
    ${true}::bool as yes, '{1,2}'::int[] as arr, '{"k": [1]}'::jsonb as j,
    '2024-01-02T03:04:05Z'::timestamptz as t, '\\x0102'::bytea as bin, 12345678901234::int8 as big`
  assert.equal(rows.length, 1)
  const r = rows[0]
  assert.equal(r.n, 42)
  assert.equal(r.s, 'a b')
  assert.equal(r.nothing, null)
  assert.equal(r.yes, true)
  assert.deepEqual(r.arr, [1, 2])
  assert.deepEqual(r.j, { k: [1] })
  assert.equal(r.t.toISOString(), '2024-01-02T03:04:05.000Z')
  assert.deepEqual([...r.bin], [1, 2])
  assert.equal(r.big, '12345678901234')
})

test('neon(): array mode and full results', async () => {
  const arr = neon(url, { arrayMode: true, fullResults: true })
  const res = await arr.query('select $1::text as a, 2 as b union all select $2, 3', ['x', 'y'])
  assert.deepEqual(res.rows, [['x', 2], ['y', 3]])
  assert.equal(res.command, 'SELECT')
  assert.equal(res.rowCount, 2)
  assert.deepEqual(res.fields.map((f) => [f.name, f.dataTypeID]), [['a', 25], ['b', 23]])
})

test('neon(): a batch transaction commits together, and an error rolls it back', async () => {
  await sql`create table if not exists neon_batch (id int primary key)`
  await sql`truncate neon_batch`
  const [ins, count] = await sql.transaction(
    [sql`insert into neon_batch values (1), (2)`, sql`select count(*)::int as n from neon_batch`],
    { isolationLevel: 'Serializable', fullResults: true },
  )
  assert.equal(ins.command, 'INSERT')
  assert.equal(ins.rowCount, 2)
  assert.equal(count.rows[0].n, 2)
  await assert.rejects(
    sql.transaction([sql`insert into neon_batch values (3)`, sql`select 1 / 0`]),
    (e) => e.code === '22012' && /division by zero/.test(e.message),
  )
  const [{ n }] = await sql`select count(*)::int as n from neon_batch`
  assert.equal(n, 2, 'the failed batch left nothing behind')
})

test('neon(): an error carries its SQLSTATE and position', async () => {
  await assert.rejects(sql`select * from no_such_table`, (e) => {
    assert.equal(e.name, 'NeonDbError')
    assert.equal(e.code, '42P01')
    assert.equal(e.severity, 'ERROR')
    assert.equal(e.position, '15')
    return true
  })
})

test('neon(): a wrong password is refused with 28P01', async () => {
  const bad = neon(url.replace(/:[^:@/]*@/, ':wrong@'))
  await assert.rejects(bad`select 1`, (e) => e.code === '28P01')
})

test('Pool over WebSocket: a transaction and parameterised queries', async () => {
  const pool = new Pool({ connectionString: url })
  try {
    const client = await pool.connect()
    try {
      await client.query('create table if not exists neon_ws (id serial primary key, v text)')
      await client.query('begin')
      await client.query('insert into neon_ws (v) values ($1), ($2)', ['one', 'two'])
      const { rows } = await client.query('select count(*)::int as n from neon_ws where v = any($1)', [['one', 'two']])
      assert.ok(rows[0].n >= 2)
      await client.query('rollback')
    } finally {
      client.release()
    }
    const all = await Promise.all([1, 2, 3, 4, 5].map((i) => pool.query('select $1::int * 2 as d', [i])))
    assert.deepEqual(all.map((r) => r.rows[0].d), [2, 4, 6, 8, 10])
  } finally {
    await pool.end()
  }
})

test('Client over WebSocket without pipelining, and a refused password', async () => {
  // Without pipelining connect() waits for the login's outcome (a pipelined login
  // reports a refused password on the first query instead).
  neonConfig.pipelineConnect = false
  try {
    const c = new Client({ connectionString: url })
    await c.connect()
    const { rows } = await c.query('select current_user as u')
    assert.equal(rows[0].u, new URL(url).username)
    await c.end()
    const bad = new Client({ connectionString: url.replace(/:[^:@/]*@/, ':wrong@') })
    await assert.rejects(bad.connect(), (e) => e.code === '28P01')
  } finally {
    neonConfig.pipelineConnect = 'password'
  }
})
